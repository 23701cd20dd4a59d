//! One session of the standby with a primary: the handshake (its Hello
//! checked, the guest's VM built here), the receive loop (verify, apply
//! atomically, ack), and, when the primary is lost after a commit, the
//! fencing notice and the hand-over to the takeover.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::protocol::Subject;
use ftvmm_checkpoint::wire::{
    encode_message, Ack, HelloAck, Limits, Message, Refuse, MAX_HASHES_PER_MESSAGE,
};
use ftvmm_checkpoint::{
    ApplyError, DiskHashes, DiskSync, EpochFence, FenceError, Frame, FrameReader, Hello, Role,
    Staging, StagingConfig, StagingError, WireError, DEFAULT_STATE_LIMIT, WIRE_VERSION,
};
use ftvmm_transport::{Channel, DataChannel, Heartbeat, HeartbeatHandle, HeartbeatStream};

use super::super::arbiter::{Arbiter, Claim, RETRY};
use super::super::console::HeldOutput;
use super::super::disk::{block_hashes, crc_line, size_of, DiskError, Replicas};
use super::super::{FtError, HEARTBEAT_MISSES};
use super::takeover::{config_for, ShapeError, Takeover};
use super::{lock, Fencing, SessionEnd, SharedStatus, StandbyOptions};
use crate::vm::{Vm, VmError};
use vm_memory::GuestMemoryBackend;

/// How long a connected primary gets to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a primary was refused at the handshake; nothing of this standby
/// changed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The handshake's staging.
    #[error("{0}")]
    Staging(#[from] StagingError),
    /// Something other than a Hello came first.
    #[error("expected Hello, got {0}")]
    NotHello(&'static str),
    /// The Hello could not be read.
    #[error("bad handshake: {0}")]
    BadHandshake(WireError),
    /// Another wire version.
    #[error("wire version {0} is not supported (this standby speaks {WIRE_VERSION})")]
    Version(u16),
    /// The peer does not say it is a primary.
    #[error("the peer does not claim the primary role")]
    NotPrimary,
    /// An older generation than one already served (I5).
    #[error("{0}")]
    Stale(FenceError),
    /// The guest's shape is out of bounds.
    #[error("guest shape refused: {0}")]
    Limits(WireError),
    /// The primary's epoch settings are out of bounds.
    #[error("{0}")]
    Epochs(WireError),
    /// The guest's shape does not fit this standby's resources.
    #[error("guest shape refused: {0}")]
    Shape(#[from] ShapeError),
    /// This standby's console.
    #[error("cannot open this standby's console: {0}")]
    Console(VmError),
    /// Building the VM.
    #[error("cannot build the guest's VM here: {0}")]
    Vm(VmError),
    /// A second handle on a replica.
    #[error("{0}")]
    Disk(DiskError),
    /// The witness settings do not match, or the witness disagrees.
    #[error("witness: {0}")]
    Witness(String),
    /// A replica that does not match the guest's disk.
    #[error("replica '{path}' ({bytes} bytes{}) does not match the guest's disk ({guest_bytes} bytes{}): give this standby a replica of the same size and mode", if *.readonly { ", readonly" } else { "" }, if *.guest_readonly { ", readonly" } else { "" })]
    DiskMismatch {
        /// The replica.
        path: String,
        /// Its size.
        bytes: u64,
        /// Whether this standby serves it readonly.
        readonly: bool,
        /// The primary's disk size.
        guest_bytes: u64,
        /// Whether the primary's is readonly.
        guest_readonly: bool,
    },
}

/// Why the receive loop ended, other than the primary's goodbye.
#[derive(Debug, thiserror::Error)]
pub enum StreamEnd {
    /// An initial-sync frame of another generation.
    #[error("{0}")]
    SyncGeneration(FenceError),
    /// An initial-sync frame could not be applied.
    #[error("applying initial sync: {0}")]
    ApplySync(ApplyError),
    /// A checkpoint out of order or of another generation.
    #[error("{0}")]
    Fence(#[from] FenceError),
    /// A checkpoint could not be applied.
    #[error("applying checkpoint {epoch}: {source}")]
    Apply {
        /// The checkpoint.
        epoch: u64,
        /// Why.
        source: ApplyError,
    },
    /// The ack could not be sent.
    #[error("sending ack {epoch}: {source}")]
    Ack {
        /// The checkpoint.
        epoch: u64,
        /// Why.
        source: Box<FtError>,
    },
    /// A checkpoint's disk writes could not be applied to the replica.
    #[error("applying the disk writes of checkpoint {epoch}: {source}")]
    Disk {
        /// The checkpoint (0: the initial sync).
        epoch: u64,
        /// Why.
        source: DiskError,
    },
    /// A frame the primary must not send.
    #[error("unexpected {0} from the primary")]
    Unexpected(&'static str),
    /// The connection closed.
    #[error("the primary closed the connection")]
    Closed,
    /// The stream broke (torn, corrupt, reset, shut down).
    #[error(transparent)]
    Wire(WireError),
}

fn send_message(chan: &mut DataChannel, msg: &Message) -> Result<(), FtError> {
    let mut buf = Vec::new();
    encode_message(msg, &mut buf)?;
    chan.send_all(&buf)?;
    Ok(())
}

/// Tells a primary why it is refused, and hangs up.
pub fn refuse(chan: &mut DataChannel, reason: &str) {
    log::warn!("refusing primary {}: {reason}", chan.peer_addr());
    let _ = send_message(
        chan,
        &Message::Refuse(Refuse {
            reason: reason.to_string(),
        }),
    );
    let _ = chan.shutdown();
}

/// The guest's copy on this standby, built from a primary's Hello.
struct Replica {
    hello: Hello,
    vm: Vm,
    console: Arc<HeldOutput>,
    staging: Staging,
    disks: Replicas,
}

/// Reads and checks the primary's Hello; `reader` keeps the handshake's
/// limits.
fn read_hello(
    chan: &mut DataChannel,
    reader: &mut FrameReader,
    fencing: &Fencing,
) -> Result<Hello, Refusal> {
    let mut ctl = Staging::new(StagingConfig {
        max_pages: 0,
        ..Limits::handshake().staging_config()
    })?;
    let hello = match reader.read_frame(chan, &mut ctl) {
        Ok(Frame::Message(Message::Hello(h))) => h,
        Ok(Frame::Message(m)) => return Err(Refusal::NotHello(m.kind().name())),
        Ok(Frame::Checkpoint(_)) => return Err(Refusal::NotHello("a checkpoint")),
        Err(e) => return Err(Refusal::BadHandshake(e)),
    };
    if hello.version != WIRE_VERSION {
        return Err(Refusal::Version(hello.version));
    }
    if hello.role != Role::Primary {
        return Err(Refusal::NotPrimary);
    }
    hello.epochs.validate().map_err(Refusal::Epochs)?;
    EpochFence::new(fencing.max_generation)
        .admit_hello(hello.generation)
        .map_err(Refusal::Stale)?;
    Ok(hello)
}

/// Both sides decide with a witness or neither does; with one, the Hello's
/// generation must be the one the witness holds for the VM (the primary
/// claimed it for this pairing).
fn admit_witness(hello: &Hello, opts: &StandbyOptions) -> Result<Arbiter, Refusal> {
    match (&opts.witness, hello.witnessed) {
        (None, false) => Ok(Arbiter::none()),
        (Some(_), false) => Err(Refusal::Witness(
            "this standby decides takeovers with a witness and the primary has none: give both the same --witness".into(),
        )),
        (None, true) => Err(Refusal::Witness(
            "the primary decides role changes with a witness: give this standby the same --witness".into(),
        )),
        (Some(urls), true) => {
            let owner = format!("standby {} (pid {})", opts.listen, std::process::id());
            let a = Arbiter::witness(urls, &hello.vm_id, owner)
                .map_err(|e| Refusal::Witness(e.to_string()))?;
            a.current(hello.generation).map_err(Refusal::Witness)?;
            Ok(a)
        }
    }
}

/// Builds the guest's VM here for `hello`, and sets `reader`'s limits to
/// its shape.
fn build_replica(
    hello: Hello,
    opts: &StandbyOptions,
    reader: &mut FrameReader,
) -> Result<Replica, Refusal> {
    let host_mem = crate::memory::host_memory_mib().unwrap_or(u64::MAX >> 20) << 20;
    let mut limits =
        Limits::for_shape(&hello.shape, host_mem, DEFAULT_STATE_LIMIT).map_err(Refusal::Limits)?;
    let config = config_for(&hello.shape, opts)?;
    let console =
        HeldOutput::new(crate::vm::open_serial_output(&config.serial).map_err(Refusal::Console)?);
    let vm = Vm::create_with_output(&config, console.writer()).map_err(Refusal::Vm)?;
    let disks = Replicas::new(&vm).map_err(Refusal::Disk)?;
    for (d, guest) in disks.disks().iter().zip(&hello.shape.devices.disks) {
        let (bytes, readonly) = (size_of(d), d.readonly());
        if bytes != guest.bytes || readonly != guest.readonly {
            return Err(Refusal::DiskMismatch {
                path: d.path().display().to_string(),
                bytes,
                readonly,
                guest_bytes: guest.bytes,
                guest_readonly: guest.readonly,
            });
        }
    }
    limits.gpa_end = vm.memory.last_addr().0 + 1;
    let staging = Staging::new(limits.staging_config())?;
    reader.set_limits(limits);
    Ok(Replica {
        hello,
        vm,
        console,
        staging,
        disks,
    })
}

/// Sends the primary the block hashes of every replica, when it asked for
/// them (the initial sync then sends only the blocks that differ).
fn send_hashes(chan: &mut DataChannel, replica: &Replica) -> Result<(), FtError> {
    if replica.hello.disk_sync != DiskSync::Hashes {
        return Ok(());
    }
    for (i, d) in replica.disks.disks().iter().enumerate() {
        let hashes = block_hashes(d)?;
        for (n, chunk) in hashes.chunks(MAX_HASHES_PER_MESSAGE).enumerate() {
            let msg = Message::DiskHashes(DiskHashes {
                disk: i as u32,
                first: (n * MAX_HASHES_PER_MESSAGE) as u64,
                hashes: chunk.to_vec(),
            });
            send_message(chan, &msg)?;
        }
    }
    Ok(())
}

/// Shuts `chan` down when the heartbeat detector declares the primary lost,
/// so the blocked read of the receive loop ends; a torn frame is then
/// discarded (I2).
fn spawn_watcher(hb: &HeartbeatHandle, chan: &DataChannel, stop: Arc<AtomicBool>) {
    let Ok(c) = chan.try_clone() else { return };
    let detector = hb.detector().clone();
    let _ = std::thread::Builder::new()
        .name("ft-watch".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Watcher);
            while !stop.load(Ordering::Acquire) {
                if detector.wait_failure(Duration::from_millis(200)).is_some() {
                    let _ = c.shutdown();
                    return;
                }
            }
        });
}

/// The receive side of a paired session.
struct Receiver<'a> {
    chan: DataChannel,
    hb: HeartbeatHandle,
    reader: FrameReader,
    replica: Replica,
    fence: EpochFence,
    /// The last committed checkpoint's machine state.
    committed: Vec<u8>,
    opts: &'a StandbyOptions,
    shared: &'a SharedStatus,
    /// Who decides whether this standby may take over.
    arbiter: Arbiter,
}

impl Receiver<'_> {
    /// Receives, verifies, applies and acks until the stream ends: `Ok` on
    /// the primary's goodbye.
    fn run(&mut self) -> Result<(), StreamEnd> {
        let mut scratch: Vec<u8> = Vec::new();
        loop {
            let cp = match self
                .reader
                .read_frame(&mut self.chan, &mut self.replica.staging)
            {
                Ok(Frame::Checkpoint(cp)) => cp,
                Ok(Frame::Message(Message::Bye)) => return Ok(()),
                Ok(Frame::Message(m)) => return Err(StreamEnd::Unexpected(m.kind().name())),
                Err(WireError::Closed) => return Err(StreamEnd::Closed),
                Err(e) => return Err(StreamEnd::Wire(e)),
            };
            let mem = &self.replica.vm.memory;
            let disks = &self.replica.disks;
            let apply_disks = |epoch| {
                cp.disk_segments().try_for_each(|(disk, records)| {
                    disks
                        .apply(disk, records)
                        .map(drop)
                        .map_err(|source| StreamEnd::Disk { epoch, source })
                })
            };
            if cp.state_len() == 0 {
                // Initial sync: pages and disk blocks, nothing commits.
                self.fence
                    .check(Subject::InitialSync, cp.generation())
                    .map_err(StreamEnd::SyncGeneration)?;
                cp.apply(mem, &mut scratch).map_err(StreamEnd::ApplySync)?;
                apply_disks(0)?;
                continue;
            }
            self.fence.admit(cp.generation(), cp.epoch())?;
            let epoch = cp.epoch();
            let state = cp
                .apply(mem, &mut scratch)
                .map_err(|source| StreamEnd::Apply { epoch, source })?;
            // The epoch's disk writes, verified with the rest of the frame,
            // in order; durable before the ack if the guest flushed.
            apply_disks(epoch)?;
            self.committed.clear();
            self.committed.extend_from_slice(state);
            self.commit(epoch)?;
        }
    }

    /// Checkpoint `epoch` is applied: record it, and ack it.
    fn commit(&mut self, epoch: u64) -> Result<(), StreamEnd> {
        let generation = self.replica.hello.generation;
        let first = self.fence.last_applied().is_none();
        self.fence.commit(epoch);
        {
            let mut sh = lock(self.shared);
            sh.committed = Some(epoch);
            sh.applied += 1;
        }
        if first {
            // From now on losing the primary means taking over: our
            // farewell heartbeat fences it (I5).
            self.hb.set_successor_generation(self.fence.successor());
        }
        if self.opts.hash_epoch == Some(epoch) {
            log::info!(
                target: crate::REPORT,
                "memory crc at epoch {epoch}: {:08x}",
                super::super::memory_crc(&self.replica.vm.memory)
            );
            self.log_disk_crc(&format!("at epoch {epoch}"));
        }
        self.hb.set_epoch(epoch);
        if let Some(d) = self.opts.ack_delay {
            std::thread::sleep(d);
        }
        send_message(&mut self.chan, &Message::Ack(Ack { epoch, generation })).map_err(|e| {
            StreamEnd::Ack {
                epoch,
                source: Box::new(e),
            }
        })
    }

    /// The replicas' CRC line (test hook).
    fn log_disk_crc(&self, when: &str) {
        if !self.replica.disks.disks().is_empty() {
            log::info!(
                target: crate::REPORT,
                "disk crc {when}: {}",
                crc_line(self.replica.disks.disks())
            );
        }
    }

    /// The primary is lost after a commit: fence it before anything else
    /// (I5). If it is alive after all (silence, not death), the notice tells
    /// it that generation + 1 now runs the guest, so it must release nothing
    /// more; then it never hears from this standby again.
    fn hand_over(
        mut self,
        why: String,
        lost_at: Instant,
        fencing: &mut Fencing,
    ) -> Result<Takeover, String> {
        let epoch = self.fence.last_applied().unwrap_or(0);
        if let Err(outvoted) = self.win_takeover(fencing) {
            self.hb.stop();
            return Err(outvoted);
        }
        if self.opts.hash_epoch.is_some() {
            self.log_disk_crc(&format!("at takeover from checkpoint {epoch}"));
        }
        let successor = self.fence.take_over();
        self.hb.set_epoch(epoch);
        self.hb.announce_takeover(successor);
        fencing.max_generation = successor;
        let _ = send_message(
            &mut self.chan,
            &Message::Refuse(Refuse {
                reason: format!(
                    "the standby took over from checkpoint {epoch} as generation {successor}"
                ),
            }),
        );
        let _ = self.chan.shutdown();
        let Replica {
            hello, vm, console, ..
        } = self.replica;
        Ok(Takeover {
            vm: Box::new(vm),
            console,
            heartbeat: Duration::from_millis(u64::from(hello.heartbeat_ms.max(1))),
            epochs: hello.epochs,
            witness: self.opts.witness.clone().filter(|_| hello.witnessed),
            vm_id: hello.vm_id,
            security: self.opts.security.clone(),
            shape: hello.shape,
            state: self.committed,
            epoch,
            why,
            lost_at,
        })
    }

    /// With a witness, the takeover is a claim of the next generation: won,
    /// this standby runs the guest; lost (the primary went on), it discards
    /// its copy; unanswered, it asks again and runs nothing meanwhile.
    fn win_takeover(&mut self, fencing: &mut Fencing) -> Result<(), String> {
        let generation = self.replica.hello.generation;
        let mut warned = false;
        loop {
            match self.arbiter.claim(generation) {
                Claim::Won(_) => return Ok(()),
                Claim::Lost(r) => {
                    fencing.max_generation = fencing.max_generation.max(r.generation);
                    let _ = self.chan.shutdown();
                    return Err(format!(
                        "the witness gave generation {} to {}: this standby discards its copy and runs nothing",
                        r.generation, r.owner
                    ));
                }
                Claim::Unreachable(e) => {
                    if !warned {
                        log::warn!(
                            "primary lost and the witness unreachable ({e}): not taking over until it answers"
                        );
                        warned = true;
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }
}

/// Serves one primary from its Hello to its end.
pub fn serve(
    mut chan: DataChannel,
    hb: HeartbeatStream,
    opts: &StandbyOptions,
    fencing: &mut Fencing,
    busy: &Mutex<Option<String>>,
    shared: &SharedStatus,
) -> SessionEnd {
    let peer = chan.peer_addr().to_string();
    if let Err(e) = chan.set_read_timeout(Some(HELLO_TIMEOUT)) {
        log::warn!("primary {peer}: {e}");
        return SessionEnd::Refused;
    }
    let mut reader = FrameReader::new(Limits::handshake());
    // A sealed channel authenticates every byte: the frames' CRCs add
    // nothing there (docs/design.md "Channel security").
    reader.trust_channel(chan.cipher().is_some());
    let replica = read_hello(&mut chan, &mut reader, fencing).and_then(|hello| {
        let arbiter = admit_witness(&hello, opts)?;
        Ok((build_replica(hello, opts, &mut reader)?, arbiter))
    });
    let (replica, arbiter) = match replica {
        Ok(r) => r,
        Err(refusal) => {
            // A refused primary may retry at once: free the standby before
            // answering.
            *busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
            refuse(&mut chan, &refusal.to_string());
            return SessionEnd::Refused;
        }
    };
    let generation = replica.hello.generation;
    fencing.max_generation = generation;
    let ack = Message::HelloAck(HelloAck {
        version: WIRE_VERSION,
        generation,
    });
    if let Err(e) = send_message(&mut chan, &ack) {
        return SessionEnd::LostEmpty(e.to_string());
    }
    let interval = Duration::from_millis(u64::from(replica.hello.heartbeat_ms.max(1)));
    // The heartbeat threads inherit their filter from the helper that
    // starts them.
    let hb = crate::seccomp::within(crate::seccomp::ThreadKind::Heartbeat, || {
        Heartbeat::start(hb, interval, HEARTBEAT_MISSES, generation)
    });
    let hb = match hb {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return SessionEnd::LostEmpty(e.to_string()),
        Err(e) => return SessionEnd::LostEmpty(e.to_string()),
    };
    // RDMA's keepalive feeds the same detector (TCP: nothing to start).
    if let Err(e) = chan.start_keepalive(hb.detector(), interval, HEARTBEAT_MISSES) {
        hb.stop();
        return SessionEnd::LostEmpty(e.to_string());
    }
    let stop = Arc::new(AtomicBool::new(false));
    spawn_watcher(&hb, &chan, stop.clone());
    if let Err(e) = send_hashes(&mut chan, &replica) {
        stop.store(true, Ordering::Release);
        hb.stop();
        return SessionEnd::LostEmpty(e.to_string());
    }
    log::info!(
        "paired with primary {peer} over {}, generation {generation}",
        chan.transport()
    );
    {
        let mut sh = lock(shared);
        sh.peer = Some(peer.clone());
        sh.generation = generation;
        sh.applied = 0;
        sh.chan = chan.try_clone().ok();
    }
    let _ = chan.set_read_timeout(None);
    let mut rx = Receiver {
        chan,
        hb,
        reader,
        replica,
        fence: EpochFence::new(generation),
        committed: Vec::new(),
        opts,
        shared,
        arbiter,
    };
    let end = rx.run();
    stop.store(true, Ordering::Release);
    let end = match end {
        Ok(()) => {
            rx.hb.stop();
            return SessionEnd::Bye;
        }
        Err(end) => end,
    };
    let lost_at = Instant::now();
    let why = if lock(shared).manual {
        "manual failover (ctl failover)".to_string()
    } else {
        match rx.hb.failure() {
            Some(lost) => format!("{lost}; {end}"),
            None => end.to_string(),
        }
    };
    if rx.fence.last_applied().is_none() {
        let _ = rx.chan.shutdown();
        rx.hb.stop();
        return SessionEnd::LostEmpty(why);
    }
    match rx.hand_over(why, lost_at, fencing) {
        Ok(t) => SessionEnd::Takeover(Box::new(t)),
        Err(outvoted) => SessionEnd::Outvoted(outvoted),
    }
}
