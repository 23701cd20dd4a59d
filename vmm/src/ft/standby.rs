//! The standby: receives the primary's checkpoints into its own staging,
//! verifies and applies them atomically, acknowledges them, and when the
//! primary is lost restores the last committed checkpoint through the same
//! builder as a boot and runs the guest (DESIGN "Standby and failover").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::wire::{encode_message, Ack, HelloAck, Limits, Message, Refuse};
use ftvmm_checkpoint::{
    decode_state, EpochFence, Frame, FrameReader, Role, Staging, StagingConfig, WireError,
    DEFAULT_STATE_LIMIT, WIRE_VERSION,
};
use ftvmm_transport::{
    Channel, ChannelListener, Heartbeat, HeartbeatStream, TcpChannel, TransportError,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::console::HeldOutput;
use super::{FtError, HEARTBEAT_MISSES};
use crate::config::{DiskConfig, KernelSource, NetConfig, SerialConfig, VmConfig};
use crate::persist::MachineState;
use crate::vcpu::VmExit;
use crate::vm::Vm;

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
    chan: Option<TcpChannel>,
    /// `ctl failover` asked for a takeover.
    manual: bool,
}

type SharedStatus = Arc<Mutex<Shared>>;

fn lock(s: &SharedStatus) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The API of a standby that mirrors (or waits for) a primary.
fn standby_handler(shared: SharedStatus) -> crate::api::Handler {
    use crate::api::{Request, Response};
    Box::new(move |req| {
        let status = |sh: &Shared| {
            serde_json::json!({
                "role": "standby",
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

/// How long a connected primary gets to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

fn send_message(chan: &mut TcpChannel, msg: &Message) -> Result<(), FtError> {
    let mut buf = Vec::new();
    encode_message(msg, &mut buf)?;
    chan.send_all(&buf)?;
    Ok(())
}

fn refuse(chan: &mut TcpChannel, reason: &str) {
    log::warn!("refusing primary {}: {reason}", chan.peer_addr());
    let _ = send_message(
        chan,
        &Message::Refuse(Refuse {
            reason: reason.to_string(),
        }),
    );
    let _ = chan.shutdown();
}

/// What became of a session with a primary.
enum SessionEnd {
    /// The primary finished (its guest ended): nothing to take over.
    Bye,
    /// The primary was refused; this standby's state is untouched.
    Refused,
    /// The primary was lost before any checkpoint committed: nothing to run.
    LostEmpty(String),
    /// The primary was lost after a checkpoint committed: take over.
    Takeover(Box<Takeover>),
}

/// Everything a takeover needs.
struct Takeover {
    vm: Box<Vm>,
    console: Arc<HeldOutput>,
    shape: ftvmm_checkpoint::GuestShape,
    heartbeat: Duration,
    state: Vec<u8>,
    epoch: u64,
    why: String,
    lost_at: Instant,
}

/// The standby's memory of past sessions, for fencing (I5).
struct Fencing {
    /// Highest generation ever accepted.
    max_generation: u64,
}

/// Runs a standby until it has taken over and its guest ended (returns the
/// guest's exit reason), or until a primary said goodbye.
pub fn run_standby(opts: &StandbyOptions) -> Result<Option<VmExit>, FtError> {
    let shared: SharedStatus = Arc::default();
    let api = match &opts.api {
        Some(path) => Some(
            crate::api::ApiServer::start(path, standby_handler(shared.clone()))
                .map_err(|e| FtError::Io(std::io::Error::other(e.to_string())))?,
        ),
        None => None,
    };
    let mut listener =
        ChannelListener::bind(opts.listen.as_str()).map_err(|source| FtError::Listen {
            addr: opts.listen.clone(),
            source,
        })?;
    log::info!("standby listening on {}", listener.local_addr());
    let busy: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (tx, rx) = mpsc::channel::<(TcpChannel, HeartbeatStream)>();
    {
        let busy = busy.clone();
        std::thread::Builder::new()
            .name("ft-accept".into())
            .spawn(move || loop {
                match listener.accept_pair(Duration::from_secs(3600)) {
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
            })
            .map_err(|e| {
                FtError::Io(std::io::Error::other(format!("cannot spawn acceptor: {e}")))
            })?;
    }

    let mut fencing = Fencing { max_generation: 0 };
    loop {
        let (chan, hb) = rx
            .recv()
            .map_err(|_| FtError::Io(std::io::Error::other("acceptor thread ended")))?;
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

/// Restores the committed checkpoint and runs the guest here, as
/// generation `generation`, through the same loop as a primary (unprotected
/// until `ctl protect` pairs it with a new standby).
fn take_over(
    t: Takeover,
    generation: u64,
    api: Option<&crate::api::ApiServer>,
) -> Result<VmExit, FtError> {
    let Takeover {
        mut vm,
        console,
        shape,
        heartbeat,
        state,
        epoch,
        why,
        lost_at,
    } = t;
    let machine: MachineState = decode_state(&state, DEFAULT_STATE_LIMIT)?;
    vm.restore(&machine)?;
    // Pages written by the apply are not "dirty" for this VM's own future.
    reset_vmm_bitmap(&vm);
    let announce = announce_nics(&vm);
    vm.start()?;
    ftvmm_netbuf::announce::spawn_announcer(announce);
    log::info!(
        target: crate::REPORT,
        "standby took over from checkpoint {epoch} ({why}); guest running {:.1} ms after the primary was lost",
        lost_at.elapsed().as_secs_f64() * 1e3
    );
    let mailbox = match api {
        Some(server) => {
            let (mailbox, handler) = crate::api::mailbox()?;
            server.set_handler(handler);
            Some(mailbox)
        }
        None => None,
    };
    let ft = super::FtOptions {
        peer: String::new(),
        interval: super::DEFAULT_INTERVAL,
        heartbeat,
        generation,
        metrics_path: None,
        fault: None,
        hash_epoch: None,
        netbuf: ftvmm_netbuf::NetbufConfig::default(),
    };
    super::runner::Runner::new(*vm, shape, console, ft, mailbox, "standby (took over)")?.run()
}

/// Takeover announce (DESIGN "Standby and failover"): each NIC's transmit
/// sink learns the guest's IPv4 addresses from its traffic, for the
/// gratuitous ARPs that go out, with a RARP per MAC, once the guest runs.
fn announce_nics(vm: &Vm) -> Vec<ftvmm_netbuf::announce::AnnounceNic> {
    use ftvmm_netbuf::announce::{AnnounceNic, LearningSink};
    let mut nics = Vec::new();
    for (i, dev) in vm.devices.net().iter().enumerate() {
        let mac = dev.with_device(|d| d.mac());
        let taps = vm
            .devices
            .net_tap(i)
            .and_then(Result::ok)
            .zip(vm.devices.net_tap(i).and_then(Result::ok));
        let Some((for_sink, for_announce)) = taps else {
            log::warn!("NIC {i}: no second tap handle; no takeover announce");
            continue;
        };
        let (sink, learnt) = LearningSink::new(Box::new(for_sink), mac);
        vm.devices.set_net_sink(i, Box::new(sink));
        nics.push(AnnounceNic {
            wire: Box::new(for_announce),
            mac,
            learnt,
        });
    }
    nics
}

fn reset_vmm_bitmap(vm: &Vm) {
    for region in vm.memory.iter() {
        let bm = std::ops::Deref::deref(region).bitmap();
        let mut scratch = ftvmm_checkpoint::HarvestBuffer::new((region.len() / 4096) as usize);
        let kvm_none = vec![0u64; ((region.len() / 4096) as usize).div_ceil(64)];
        let _ = scratch.harvest(&kvm_none, bm);
    }
}

/// The VM config a Hello describes, with this host's resources.
fn config_for(
    shape: &ftvmm_checkpoint::GuestShape,
    opts: &StandbyOptions,
) -> Result<VmConfig, String> {
    if !shape.mem_bytes.is_multiple_of(1 << 20) {
        return Err(format!(
            "guest memory {} bytes is not a whole number of MiB",
            shape.mem_bytes
        ));
    }
    if shape.devices.nic_macs.len() != opts.net.len() {
        return Err(format!(
            "the guest has {} NICs but this standby was given {} --net taps",
            shape.devices.nic_macs.len(),
            opts.net.len()
        ));
    }
    if shape.devices.disks as usize != opts.disks.len() {
        return Err(format!(
            "the guest has {} disks but this standby was given {} --disk replicas",
            shape.devices.disks,
            opts.disks.len()
        ));
    }
    let net = opts
        .net
        .iter()
        .zip(&shape.devices.nic_macs)
        .map(|(n, mac)| NetConfig {
            tap: n.tap.clone(),
            mac: (*mac != [0; 6]).then_some(crate::config::MacAddr(*mac)),
        })
        .collect();
    Ok(VmConfig {
        kernel: KernelSource::EmbeddedTestGuest,
        initrd: None,
        cmdline: shape.cmdline.clone(),
        mem_mib: shape.mem_bytes >> 20,
        vcpus: shape.vcpus as u8,
        net,
        disks: opts.disks.clone(),
        serial: opts.serial.clone(),
        dirty_ring: false,
    })
}

/// Serves one primary from its Hello to its end.
fn serve(
    mut chan: TcpChannel,
    hb: HeartbeatStream,
    opts: &StandbyOptions,
    fencing: &mut Fencing,
    busy: &Mutex<Option<String>>,
    shared: &SharedStatus,
) -> SessionEnd {
    let peer = chan.peer_addr().to_string();
    // A refused primary may retry at once: free the standby before answering.
    let refuse = |chan: &mut TcpChannel, reason: &str| {
        *busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        refuse(chan, reason);
    };
    // Handshake.
    let limits = Limits::handshake();
    let mut reader = FrameReader::new(limits);
    let mut ctl = match Staging::new(StagingConfig {
        max_pages: 0,
        ..limits.staging_config()
    }) {
        Ok(s) => s,
        Err(e) => {
            refuse(&mut chan, &e.to_string());
            return SessionEnd::Refused;
        }
    };
    if let Err(e) = chan.set_read_timeout(Some(HELLO_TIMEOUT)) {
        log::warn!("primary {peer}: {e}");
        return SessionEnd::Refused;
    }
    let hello = match reader.read_frame(&mut chan, &mut ctl) {
        Ok(Frame::Message(Message::Hello(h))) => h,
        Ok(Frame::Message(m)) => {
            refuse(
                &mut chan,
                &format!("expected Hello, got {}", m.kind().name()),
            );
            return SessionEnd::Refused;
        }
        Ok(Frame::Checkpoint(_)) => {
            refuse(&mut chan, "expected Hello, got a checkpoint");
            return SessionEnd::Refused;
        }
        Err(e) => {
            refuse(&mut chan, &format!("bad handshake: {e}"));
            return SessionEnd::Refused;
        }
    };
    if hello.version != WIRE_VERSION {
        refuse(
            &mut chan,
            &format!(
                "wire version {} is not supported (this standby speaks {WIRE_VERSION})",
                hello.version
            ),
        );
        return SessionEnd::Refused;
    }
    if hello.role != Role::Primary {
        refuse(&mut chan, "the peer does not claim the primary role");
        return SessionEnd::Refused;
    }
    if hello.generation < fencing.max_generation {
        refuse(
            &mut chan,
            &format!(
                "generation {} is older than generation {} this standby already served: a stale primary is fenced",
                hello.generation, fencing.max_generation
            ),
        );
        return SessionEnd::Refused;
    }
    let host_mem = crate::memory::host_memory_mib().unwrap_or(u64::MAX >> 20) << 20;
    let limits = match Limits::for_shape(&hello.shape, host_mem, DEFAULT_STATE_LIMIT) {
        Ok(l) => l,
        Err(e) => {
            refuse(&mut chan, &format!("guest shape refused: {e}"));
            return SessionEnd::Refused;
        }
    };
    let config = match config_for(&hello.shape, opts) {
        Ok(c) => c,
        Err(e) => {
            refuse(&mut chan, &format!("guest shape refused: {e}"));
            return SessionEnd::Refused;
        }
    };
    let console = HeldOutput::new(match crate::vm::open_serial_output(&config.serial) {
        Ok(o) => o,
        Err(e) => {
            refuse(
                &mut chan,
                &format!("cannot open this standby's console: {e}"),
            );
            return SessionEnd::Refused;
        }
    });
    let vm = match Vm::create_with_output(&config, console.writer()) {
        Ok(vm) => vm,
        Err(e) => {
            refuse(&mut chan, &format!("cannot build the guest's VM here: {e}"));
            return SessionEnd::Refused;
        }
    };
    let mut limits = limits;
    limits.gpa_end = vm.memory.last_addr().0 + 1;
    let mut staging = match Staging::new(limits.staging_config()) {
        Ok(s) => s,
        Err(e) => {
            refuse(&mut chan, &e.to_string());
            return SessionEnd::Refused;
        }
    };
    reader.set_limits(limits);
    fencing.max_generation = hello.generation;
    let generation = hello.generation;
    if let Err(e) = send_message(
        &mut chan,
        &Message::HelloAck(HelloAck {
            version: WIRE_VERSION,
            generation,
        }),
    ) {
        return SessionEnd::LostEmpty(e.to_string());
    }
    let interval = Duration::from_millis(u64::from(hello.heartbeat_ms.max(1)));
    let hb = match Heartbeat::start(hb, interval, HEARTBEAT_MISSES, generation) {
        Ok(h) => h,
        Err(e) => return SessionEnd::LostEmpty(e.to_string()),
    };
    // A dead primary stops its heartbeats: shut the data channel so the
    // blocked read below ends; a torn frame is then discarded (I2).
    let stop = Arc::new(AtomicBool::new(false));
    if let Ok(c) = chan.try_clone() {
        let detector = hb.detector().clone();
        let stop = stop.clone();
        let _ = std::thread::Builder::new()
            .name("ft-watch".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if detector.wait_failure(Duration::from_millis(200)).is_some() {
                        let _ = c.shutdown();
                        return;
                    }
                }
            });
    }
    log::info!("paired with primary {peer}, generation {generation}");
    {
        let mut sh = lock(shared);
        sh.peer = Some(peer.clone());
        sh.generation = generation;
        sh.applied = 0;
        sh.chan = chan.try_clone().ok();
    }
    let _ = chan.set_read_timeout(None);

    let mut fence = EpochFence::new(generation);
    let mut committed: Vec<u8> = Vec::new();
    let mut scratch: Vec<u8> = Vec::new();
    let mut have_commit = false;
    let end = loop {
        let frame = reader.read_frame(&mut chan, &mut staging);
        match frame {
            Ok(Frame::Checkpoint(cp)) => {
                if cp.state_len() == 0 {
                    // Initial sync: pages only, nothing commits.
                    if cp.generation() != generation {
                        break format!("initial-sync frame of generation {}", cp.generation());
                    }
                    if let Err(e) = cp.apply(&vm.memory, &mut scratch) {
                        break format!("applying initial sync: {e}");
                    }
                    continue;
                }
                if let Err(e) = fence.admit(cp.generation(), cp.epoch()) {
                    break format!("checkpoint refused: {e}");
                }
                let epoch = cp.epoch();
                match cp.apply(&vm.memory, &mut scratch) {
                    Ok(state) => {
                        committed.clear();
                        committed.extend_from_slice(state);
                    }
                    Err(e) => break format!("applying checkpoint {epoch}: {e}"),
                }
                fence.commit(epoch);
                {
                    let mut sh = lock(shared);
                    sh.committed = Some(epoch);
                    sh.applied += 1;
                }
                if !have_commit {
                    // From now on losing the primary means taking over: our
                    // farewell heartbeat fences it (I5).
                    hb.set_successor_generation(generation + 1);
                }
                have_commit = true;
                if opts.hash_epoch == Some(epoch) {
                    log::info!(
                        target: crate::REPORT,
                        "memory crc at epoch {epoch}: {:08x}",
                        super::memory_crc(&vm.memory)
                    );
                }
                hb.set_epoch(epoch);
                if let Some(d) = opts.ack_delay {
                    std::thread::sleep(d);
                }
                if let Err(e) = send_message(&mut chan, &Message::Ack(Ack { epoch, generation })) {
                    break format!("sending ack {epoch}: {e}");
                }
            }
            Ok(Frame::Message(Message::Bye)) => {
                stop.store(true, Ordering::Release);
                hb.stop();
                return SessionEnd::Bye;
            }
            Ok(Frame::Message(m)) => {
                break format!("unexpected {} from the primary", m.kind().name())
            }
            Err(WireError::Closed) => break "the primary closed the connection".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    let lost_at = Instant::now();
    let why = if lock(shared).manual {
        "manual failover (ctl failover)".to_string()
    } else {
        match hb.failure() {
            Some(lost) => format!("{lost}; {end}"),
            None => end,
        }
    };
    stop.store(true, Ordering::Release);
    if !have_commit {
        let _ = chan.shutdown();
        hb.stop();
        return SessionEnd::LostEmpty(why);
    }
    // Fence the old primary before anything else (I5): if it is alive after
    // all (silence, not death), the notice tells it that generation + 1 now
    // runs the guest, so it must release nothing more; then it never hears
    // from this standby again.
    let committed_epoch = fence.last_applied().unwrap_or(0);
    hb.set_epoch(committed_epoch);
    hb.announce_takeover(generation + 1);
    fencing.max_generation = generation + 1;
    let _ = send_message(
        &mut chan,
        &Message::Refuse(Refuse {
            reason: format!(
                "the standby took over from checkpoint {committed_epoch} as generation {}",
                generation + 1
            ),
        }),
    );
    let _ = chan.shutdown();
    SessionEnd::Takeover(Box::new(Takeover {
        vm: Box::new(vm),
        console,
        shape: hello.shape,
        heartbeat: interval,
        state: committed,
        epoch: fence.last_applied().unwrap_or(0),
        why,
        lost_at,
    }))
}
