//! The standby: receives the primary's checkpoints into its own staging,
//! verifies and applies them atomically, acknowledges them, and when the
//! primary is lost restores the last committed checkpoint through the same
//! builder as a boot and runs the guest (DESIGN "Standby and failover").

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvmm_transport::{Channel, ChannelListener, DataChannel, HeartbeatStream, TransportError};

mod pairing;
mod takeover;

use pairing::{refuse, serve};
use takeover::{take_over, Takeover};

use super::FtError;
use crate::config::{DiskConfig, NetConfig, SerialConfig};
use crate::vcpu::VmExit;

/// The standby's own host resources and settings.
#[derive(Debug, Clone)]
pub struct StandbyOptions {
    /// Where to listen for a primary.
    pub listen: String,
    /// The console of the guest once it runs here.
    pub serial: SerialConfig,
    /// This host's taps for the guest's NICs, in order.
    pub net: Vec<NetConfig>,
    /// This host's disk replicas, in order.
    pub disks: Vec<DiskConfig>,
    /// Print a checksum of all guest memory after applying this epoch (tests).
    pub hash_epoch: Option<u64>,
    /// Delay each ack by this much (tests of output commit).
    pub ack_delay: Option<Duration>,
    /// Control API socket.
    pub api: Option<std::path::PathBuf>,
    /// The witness's etcd endpoints (`--witness`).
    pub witness: Option<String>,
    /// What a connecting primary must prove (`--ft-key` / `--ft-insecure`).
    pub security: ftvmm_transport::Security,
}

/// What the control API can see of, and do to, a standby.
#[derive(Default)]
struct Shared {
    /// The primary, while paired.
    peer: Option<String>,
    generation: u64,
    /// Last committed checkpoint.
    committed: Option<u64>,
    /// Checkpoints applied in this session.
    applied: u64,
    /// The data channel, to end the session on a manual failover.
    chan: Option<DataChannel>,
    /// `ctl failover` asked for a takeover.
    manual: bool,
}

type SharedStatus = Arc<Mutex<Shared>>;

fn lock(s: &SharedStatus) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The API of a standby that mirrors (or waits for) a primary, listening
/// on `listen`.
fn standby_handler(shared: SharedStatus, listen: std::net::SocketAddr) -> crate::api::Handler {
    use crate::api::{Request, Response};
    Box::new(move |req| {
        let status = |sh: &Shared| {
            serde_json::json!({
                "role": "standby",
                "listen": listen.to_string(),
                "paired": sh.peer.is_some(),
                "peer": sh.peer,
                "generation": sh.generation,
                "committed_epoch": sh.committed,
                "checkpoints_applied": sh.applied,
            })
        };
        let mut sh = lock(&shared);
        match req {
            Request::Status | Request::Stats => Response::ok(status(&sh)),
            Request::Failover => match (&sh.peer, sh.committed) {
                (None, _) => {
                    Response::error("no primary is paired with this standby: nothing to take over")
                }
                (Some(_), None) => {
                    Response::error("no checkpoint has committed yet: nothing to take over")
                }
                (Some(peer), Some(epoch)) => {
                    let msg = format!("taking over from {peer} at checkpoint {epoch} or later");
                    sh.manual = true;
                    if let Some(c) = &sh.chan {
                        let _ = c.shutdown();
                    }
                    Response::ok(serde_json::json!({ "failover": msg }))
                }
            },
            other => Response::error(format!(
                "wrong state for {other:?}: this is a standby; it runs no guest until it takes over"
            )),
        }
    })
}

/// What became of a session with a primary.
enum SessionEnd {
    /// The primary finished (its guest ended): nothing to take over.
    Bye,
    /// The primary was refused; this standby's state is untouched.
    Refused,
    /// The primary was lost before any checkpoint committed: nothing to run.
    LostEmpty(String),
    /// The primary was lost, but the witness gave the VM to it: nothing to
    /// run here.
    Outvoted(String),
    /// The primary was lost after a checkpoint committed: take over.
    Takeover(Box<Takeover>),
}

/// The standby's memory of past sessions, for fencing (I5).
struct Fencing {
    /// Highest generation ever accepted.
    max_generation: u64,
}

/// The acceptor: hands each primary that connects to the standby's loop,
/// or refuses it with the reason in `busy` while the standby is busy.
fn accept_loop(
    listener: &mut ChannelListener,
    busy: &Mutex<Option<String>>,
    tx: &mpsc::Sender<(DataChannel, HeartbeatStream)>,
) {
    loop {
        // TCP, or RDMA when the primary asks for it.
        match listener.accept_data_pair(Duration::from_secs(3600)) {
            Ok((mut chan, hb)) => {
                let reason = busy.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match reason {
                    Some(r) => {
                        refuse(&mut chan, &r);
                        drop(hb);
                    }
                    None => {
                        if tx.send((chan, hb)).is_err() {
                            return;
                        }
                    }
                }
            }
            Err(TransportError::AcceptTimeout { .. }) => {}
            Err(e) if e.is_per_connection() => log::warn!("dropped a connection: {e}"),
            Err(e) => {
                log::error!("accepting primaries: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Runs a standby until it has taken over and its guest ended (returns the
/// guest's exit reason), or until a primary said goodbye.
pub fn run_standby(opts: &StandbyOptions) -> Result<Option<VmExit>, FtError> {
    let shared: SharedStatus = Arc::default();
    if opts.witness.is_none() {
        log::warn!(
            "no --witness: a network partition between primary and standby can leave two running copies of the guest"
        );
    }
    let mut listener =
        ChannelListener::bind(opts.listen.as_str()).map_err(|source| FtError::Listen {
            addr: opts.listen.clone(),
            source,
        })?;
    // The API answers once the standby listens: clients take an answer to
    // `status` as readiness.
    let api = match &opts.api {
        Some(path) => Some(
            crate::api::ApiServer::start(
                path,
                standby_handler(shared.clone(), listener.local_addr()),
            )
            .map_err(FtError::Api)?,
        ),
        None => None,
    };
    listener.set_security(opts.security.clone());
    // Set up: from here on this thread, and every thread it starts, runs
    // under the standby's seccomp filter (which allows the takeover's VM
    // build).
    crate::seccomp::apply(crate::seccomp::ThreadKind::Standby)?;
    log::info!(
        "standby listening on {}, channel {}",
        listener.local_addr(),
        opts.security.describe()
    );
    let busy: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (tx, rx) = mpsc::channel::<(DataChannel, HeartbeatStream)>();
    {
        let busy = busy.clone();
        std::thread::Builder::new()
            .name("ft-accept".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Acceptor);
                accept_loop(&mut listener, &busy, &tx)
            })
            .map_err(|source| FtError::Spawn {
                what: "acceptor",
                source,
            })?;
    }

    let mut fencing = Fencing { max_generation: 0 };
    loop {
        let (chan, hb) = rx.recv().map_err(|_| FtError::AcceptorEnded)?;
        let set_busy = |r: Option<String>| *busy.lock().unwrap_or_else(|e| e.into_inner()) = r;
        set_busy(Some("this standby is already paired with a primary".into()));
        let end = serve(chan, hb, opts, &mut fencing, &busy, &shared);
        {
            let mut sh = lock(&shared);
            sh.peer = None;
            sh.chan = None;
            sh.manual = false;
            sh.committed = None;
        }
        match end {
            SessionEnd::Bye => {
                log::info!("primary finished; standby exits");
                return Ok(None);
            }
            SessionEnd::Refused => set_busy(None),
            SessionEnd::LostEmpty(why) => {
                log::warn!("primary lost before its first checkpoint committed ({why}); nothing to run, waiting for a new primary");
                set_busy(None);
            }
            SessionEnd::Outvoted(why) => {
                log::warn!("{why}; waiting for a new primary");
                set_busy(None);
            }
            SessionEnd::Takeover(t) => {
                set_busy(Some(format!(
                    "this standby took over the guest (generation {}) and runs it",
                    fencing.max_generation
                )));
                return take_over(*t, fencing.max_generation, api.as_ref()).map(Some);
            }
        }
    }
}
