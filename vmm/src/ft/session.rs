//! The primary's live link to its standby: the pairing handshake, sending
//! checkpoints, awaiting acks, and settling why the link ended (a standby
//! that took over fences this primary, I5).
//!
//! Everything that can end a pairing comes out of here as one typed
//! [`PeerLoss`], which the runner handles in one place.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ftvmm_checkpoint::protocol::Subject;
use ftvmm_checkpoint::wire::{Ack, Limits, Message};
use ftvmm_checkpoint::{
    CheckpointFrame, DiskSync, EpochFence, FenceError, Frame, FrameReader, GuestShape, Hello, Role,
    Staging, StagingConfig, WireError, WIRE_VERSION,
};
use ftvmm_transport::{
    connect_pair_over, Channel, DataChannel, Heartbeat, HeartbeatHandle, PeerLost, TcpOptions,
    TransportError,
};

use super::fault::{die_now, Fault, FaultPoint};
use super::{FtError, FtOptions, HEARTBEAT_MISSES};

/// Handshake timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a pairing ended, as seen by the primary.
#[derive(Debug)]
pub enum PeerLoss {
    /// The heartbeat detector declared the standby lost.
    Heartbeat(PeerLost),
    /// Sending a checkpoint failed.
    Send {
        /// The checkpoint.
        epoch: u64,
        /// What the channel said (naming the checkpoint, its size, the peer).
        source: TransportError,
    },
    /// The channel could not be set up for the ack.
    Channel(TransportError),
    /// Reading the ack failed (closed, timed out, malformed).
    Ack {
        /// The checkpoint awaiting its ack.
        epoch: u64,
        /// What the stream said.
        source: WireError,
    },
    /// The standby answered something other than the expected ack.
    Unexpected {
        /// The checkpoint awaiting its ack.
        epoch: u64,
        /// What came instead.
        got: String,
    },
    /// The ack came from another generation: a stale standby, or one that
    /// took over.
    Fence(FenceError),
    /// The initial sync failed.
    InitialSync(Box<FtError>),
    /// A local failure (a pause timeout, a memory read) stopped the stream.
    Local(Box<FtError>),
}

impl fmt::Display for PeerLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerLoss::Heartbeat(l) => write!(f, "{l}"),
            PeerLoss::Send { source, .. } => write!(f, "{source}"),
            PeerLoss::Channel(e) => write!(f, "{e}"),
            PeerLoss::Ack { epoch, source } => {
                write!(f, "waiting for the ack of epoch {epoch}: {source}")
            }
            PeerLoss::Unexpected { epoch, got } => {
                write!(f, "{got} while waiting for the ack of epoch {epoch}")
            }
            PeerLoss::Fence(e) => write!(f, "{e}"),
            PeerLoss::InitialSync(e) => write!(f, "initial sync: {e}"),
            PeerLoss::Local(e) => write!(f, "checkpoint stream stopped here: {e}"),
        }
    }
}

/// The live link to the standby.
pub struct Session {
    chan: DataChannel,
    hb: HeartbeatHandle,
    reader: FrameReader,
    /// Staging for control frames the standby sends (never checkpoints).
    ctl_staging: Staging,
    watcher_stop: Arc<AtomicBool>,
    peer: String,
    generation: u64,
    /// Block hashes of each replica, from the pairing.
    replica_hashes: Vec<Vec<[u8; 32]>>,
}

impl Session {
    /// Connects to the standby at `ft.peer` and pairs: Hello with the
    /// guest's shape, its HelloAck (or its refusal), heartbeats started.
    pub fn connect(shape: &GuestShape, ft: &FtOptions) -> Result<Session, FtError> {
        let security = ft.security.as_ref().ok_or(FtError::NoKey)?;
        let (mut chan, hb_stream) = connect_pair_over(
            ft.peer.as_str(),
            CONNECT_TIMEOUT,
            &TcpOptions::default(),
            security,
            &ft.transport,
        )?;
        if let Some(cipher) = chan.cipher() {
            log::info!(
                "{} channel to {} authenticated and sealed with {}",
                chan.transport(),
                ft.peer,
                cipher.name()
            );
        }
        let hello = Message::Hello(Hello {
            version: WIRE_VERSION,
            generation: ft.generation,
            role: Role::Primary,
            heartbeat_ms: ft.heartbeat.as_millis().clamp(1, u32::MAX as u128) as u32,
            shape: shape.clone(),
            disk_sync: ft.disk_sync,
            vm_id: ft.vm_id.clone(),
            witnessed: ft.witness.is_some(),
            epochs: ft.epoch_policy(),
        });
        send_message(&mut chan, &hello)?;
        if Fault::hits(ft.fault, FaultPoint::Handshake, 0) {
            die_now("handshake");
        }
        let limits = Limits::handshake();
        let mut reader = FrameReader::new(limits);
        let mut ctl_staging = Staging::new(StagingConfig {
            max_pages: 0,
            ..limits.staging_config()
        })?;
        chan.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let protocol = |what: String| FtError::Protocol {
            peer: ft.peer.clone(),
            what,
        };
        match reader.read_frame(&mut chan, &mut ctl_staging)? {
            Frame::Message(Message::HelloAck(ack)) if ack.generation == ft.generation => {}
            Frame::Message(Message::HelloAck(ack)) => {
                return Err(protocol(format!(
                    "standby accepted generation {} but this primary is generation {}",
                    ack.generation, ft.generation
                )))
            }
            Frame::Message(Message::Refuse(r)) => {
                return Err(FtError::Refused {
                    peer: ft.peer.clone(),
                    reason: r.reason,
                })
            }
            Frame::Message(other) => {
                return Err(protocol(format!(
                    "unexpected {} in reply to Hello",
                    other.kind().name()
                )))
            }
            Frame::Checkpoint(_) => {
                return Err(protocol(
                    "standby sent a checkpoint during the handshake".into(),
                ))
            }
        }
        // The heartbeat threads inherit their filter from the helper that
        // starts them.
        let hb = crate::seccomp::within(crate::seccomp::ThreadKind::Heartbeat, || {
            Heartbeat::start(hb_stream, ft.heartbeat, HEARTBEAT_MISSES, ft.generation)
        })??;
        // RDMA's keepalive feeds the same detector (TCP: nothing to start).
        chan.start_keepalive(hb.detector(), ft.heartbeat, HEARTBEAT_MISSES)?;
        let watcher_stop = Arc::new(AtomicBool::new(false));
        spawn_failure_watcher(&hb, &chan, watcher_stop.clone());
        let mut session = Session {
            chan,
            hb,
            reader,
            ctl_staging,
            watcher_stop,
            peer: ft.peer.clone(),
            generation: ft.generation,
            replica_hashes: Vec::new(),
        };
        if ft.disk_sync == DiskSync::Hashes {
            session.replica_hashes = session.read_hashes(shape)?;
        }
        Ok(session)
    }

    /// The standby's block hashes of each replica (it sends them after its
    /// HelloAck when asked to), as many as each disk of `shape` has blocks.
    fn read_hashes(&mut self, shape: &GuestShape) -> Result<Vec<Vec<[u8; 32]>>, FtError> {
        let mut all = Vec::with_capacity(shape.devices.disks.len());
        for (i, d) in shape.devices.disks.iter().enumerate() {
            let blocks = d.bytes.div_ceil(super::disk::SYNC_BLOCK) as usize;
            // The standby reads its whole replica first: allow ≈ 50 MB/s.
            let t = CONNECT_TIMEOUT + Duration::from_millis(d.bytes / 50_000);
            self.chan.set_read_timeout(Some(t))?;
            let mut hashes = Vec::with_capacity(blocks);
            while hashes.len() < blocks {
                let got = match self
                    .reader
                    .read_frame(&mut self.chan, &mut self.ctl_staging)?
                {
                    Frame::Message(Message::DiskHashes(h))
                        if h.disk == i as u32 && h.first == hashes.len() as u64 =>
                    {
                        hashes.extend_from_slice(&h.hashes);
                        continue;
                    }
                    Frame::Message(Message::Refuse(r)) => {
                        return Err(FtError::Refused {
                            peer: self.peer.clone(),
                            reason: r.reason,
                        })
                    }
                    Frame::Message(m) => m.kind().name(),
                    Frame::Checkpoint(_) => "a checkpoint",
                };
                return Err(FtError::Protocol {
                    peer: self.peer.clone(),
                    what: format!(
                        "expected the hashes of disk {i} from block {}, got {got}",
                        hashes.len()
                    ),
                });
            }
            hashes.truncate(blocks);
            all.push(hashes);
        }
        Ok(all)
    }

    /// The standby's replica hashes (empty with `--ft-disk-sync full`).
    pub fn replica_hashes(&self) -> &[Vec<[u8; 32]>] {
        &self.replica_hashes
    }

    /// The standby's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Why the heartbeat detector declared the standby lost, if it did.
    pub fn failure(&self) -> Option<PeerLost> {
        self.hb.failure()
    }

    /// Readable once the heartbeat detector declared the standby lost.
    pub fn failure_event(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.hb.event_fd()
    }

    /// The generation this session runs as.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Streams a checkpoint (`epoch 0`: a batch of the initial sync).
    /// Returns the bytes sent.
    pub fn send_checkpoint(
        &mut self,
        frame: &CheckpointFrame<'_>,
        fault: Option<Fault>,
    ) -> Result<u64, PeerLoss> {
        let epoch = frame.epoch();
        let point = if epoch == 0 {
            FaultPoint::InitialSync
        } else {
            FaultPoint::MidCheckpoint
        };
        if Fault::hits(fault, point, epoch) {
            send_half_and_die(frame, &mut self.chan, point.name());
        }
        self.chan
            .send_checkpoint(frame)
            .map_err(|source| PeerLoss::Send { epoch, source })
    }

    /// Waits for the standby's ack of `epoch` (bounded by `timeout`; the
    /// heartbeat detector shuts the channel down sooner if the standby dies).
    pub fn await_ack(&mut self, epoch: u64, timeout: Duration) -> Result<(), PeerLoss> {
        self.hb.set_epoch(epoch);
        self.chan
            .set_read_timeout(Some(timeout))
            .map_err(PeerLoss::Channel)?;
        let unexpected = |got: String| Err(PeerLoss::Unexpected { epoch, got });
        match self
            .reader
            .read_frame(&mut self.chan, &mut self.ctl_staging)
        {
            Ok(Frame::Message(Message::Ack(Ack {
                epoch: e,
                generation: g,
            }))) if e == epoch => EpochFence::new(self.generation)
                .check(Subject::Ack { epoch }, g)
                .map_err(PeerLoss::Fence),
            Ok(Frame::Message(Message::Ack(a))) => unexpected(format!(
                "ack for epoch {} generation {}",
                a.epoch, a.generation
            )),
            Ok(Frame::Message(other)) => unexpected(other.kind().name().to_string()),
            Ok(Frame::Checkpoint(_)) => unexpected("a checkpoint".into()),
            Err(source) => Err(PeerLoss::Ack { epoch, source }),
        }
    }

    /// The guest ended: tells the standby not to take over, and closes.
    pub fn say_bye(mut self) {
        if send_message(&mut self.chan, &Message::Bye).is_ok() {
            // Our heartbeats must not end before the standby has read the
            // Bye: a standby that saw the heartbeat connection close first
            // would take the end for a death and take over a guest that
            // powered off. It closes the data channel once it has read the
            // Bye; wait for that (bounded, for a standby that vanished).
            let wait = self.hb.detector().timeout() + Duration::from_millis(100);
            let _ = self.chan.set_read_timeout(Some(wait));
            let mut sink = [0u8; 256];
            while matches!(self.chan.recv(&mut sink), Ok(n) if n > 0) {}
        }
        self.close();
    }

    /// The standby stopped answering: reads what it sent before it went (a
    /// standby that took over ends its heartbeat stream with a takeover
    /// notice), bounded by the silence timeout for a standby whose host
    /// vanished, then closes. Returns the takeover's (generation, epoch)
    /// when there was one.
    pub fn settle(self) -> Option<(u64, u64)> {
        let detector = self.hb.detector().clone();
        // If the loss was ours to see (a send or an ack failed while the
        // heartbeats flowed), the standby may not know yet: end our side of
        // both connections now, so it learns at once, and so that a standby
        // that takes over on that news fences us (its notice comes back on
        // the heartbeat connection) before we decide to run on alone.
        let _ = self.chan.shutdown();
        detector.declare(PeerLost::GaveUp);
        let settle = detector.timeout() + Duration::from_millis(100);
        if !detector.wait_receiver_done(settle) {
            log::warn!(
                "heartbeat channel of {} did not settle within {settle:?}",
                self.peer
            );
        }
        self.close();
        detector.fenced_by()
    }

    fn close(self) {
        self.watcher_stop.store(true, Ordering::Release);
        let _ = self.chan.shutdown();
        self.hb.stop();
    }
}

fn send_message(chan: &mut DataChannel, msg: &Message) -> Result<(), FtError> {
    let mut buf = Vec::new();
    ftvmm_checkpoint::wire::encode_message(msg, &mut buf)?;
    chan.send_all(&buf)?;
    Ok(())
}

/// Shuts the data channel down when the heartbeat detector declares the
/// peer lost, so a blocked send or ack read returns at once.
fn spawn_failure_watcher(hb: &HeartbeatHandle, chan: &DataChannel, stop: Arc<AtomicBool>) {
    let detector = hb.detector().clone();
    let Ok(chan) = chan.try_clone() else { return };
    let _ = std::thread::Builder::new()
        .name("ft-watch".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Watcher);
            while !stop.load(Ordering::Acquire) {
                if let Some(lost) = detector.wait_failure(Duration::from_millis(200)) {
                    log::warn!("peer lost: {lost}");
                    let _ = chan.shutdown();
                    return;
                }
            }
        });
}

/// Writes the first half of `frame`'s bytes, then dies (fault injection).
fn send_half_and_die(frame: &CheckpointFrame<'_>, chan: &mut DataChannel, what: &str) -> ! {
    let mut left = frame.len() / 2;
    for chunk in frame.chunks() {
        let n = (chunk.len() as u64).min(left) as usize;
        let _ = chan.send_all(&chunk[..n]);
        left -= n as u64;
        if left == 0 {
            break;
        }
    }
    die_now(what)
}
