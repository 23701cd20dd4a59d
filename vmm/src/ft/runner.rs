//! The loop of every running VM: a primary, an unprotected VM, and a standby
//! that took over (the same code path). Between epochs it waits on the
//! VM, the standby and the control API; at each boundary of a protected VM
//! it runs one epoch (capture, stream, ack, release); every way of losing
//! the standby ends in [`Runner::lose_standby`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvmm_checkpoint::{CheckpointFrame, DiskSync, EpochMetrics, GuestShape};
use ftvmm_netbuf::{NetOutput, OutputCommit, Outputs};

use super::adaptive::{Controller, EpochSample};
use super::arbiter::{Arbiter, Claim, RETRY};
use super::console::HeldOutput;
use super::engine::{Capture, Engine, PrecopyReport};
use super::fault::{die_now, Fault, FaultPoint};
use super::metrics::{log_netbuf_summary, MetricsLog};
use super::session::{PeerLoss, Session};
use super::wait::{self, Waiter, Wake};
use super::{FtError, FtOptions, HEARTBEAT_MISSES};
use crate::vcpu::VmExit;
use crate::vm::Vm;

/// The machinery a pairing needs, made at the first pairing and kept for
/// the next ones: the dirty tracking and staging, the network output
/// commit, and the set of every output the epochs hold.
pub struct Kit {
    pub(super) engine: Engine,
    pub(super) netbuf: Arc<dyn NetOutput>,
    pub(super) outputs: Outputs,
}

impl Kit {
    fn new(vm: &mut Vm, ft: &FtOptions, console: &Arc<HeldOutput>) -> Result<Kit, FtError> {
        let netbuf = super::primary::start_netbuf(vm, ft)?;
        let engine = Engine::with_cache(vm, ft.cache_bytes)?;
        let mut outputs = Outputs::new();
        outputs.add(console.clone());
        outputs.add(netbuf.clone());
        Ok(Kit {
            engine,
            netbuf,
            outputs,
        })
    }
}

/// Whether, and by whom, the VM is protected.
pub enum Protection {
    /// No standby: output passes straight through and dirty tracking is
    /// off. Holds the kit of an earlier pairing, if there was one.
    Unprotected(Option<Kit>),
    /// The standby was lost and the witness has not answered whether this
    /// side may go on: output stays held, no epochs run, the claim is asked
    /// again every [`arbiter::RETRY`] (nobody proceeds alone).
    Deciding {
        /// The lost standby.
        peer: String,
        /// The machinery, output held.
        kit: Kit,
    },
    /// Paired with a standby: every epoch is checkpointed to it and output
    /// is held until its ack.
    Protected {
        /// The link to the standby.
        session: Box<Session>,
        /// The machinery.
        kit: Kit,
    },
}

impl Protection {
    /// The link to the standby, while protected.
    pub fn session(&self) -> Option<&Session> {
        match self {
            Protection::Protected { session, .. } => Some(&**session),
            Protection::Unprotected(_) | Protection::Deciding { .. } => None,
        }
    }

    fn kit(&self) -> Option<&Kit> {
        match self {
            Protection::Protected { kit, .. }
            | Protection::Deciding { kit, .. }
            | Protection::Unprotected(Some(kit)) => Some(kit),
            Protection::Unprotected(None) => None,
        }
    }
}

/// How a standby that took over came to run the guest, for `status`.
#[derive(Debug, Clone)]
pub struct TookOver {
    /// The committed checkpoint it resumed.
    pub from_epoch: u64,
    /// From the loss of the primary to the guest running here.
    pub after_loss: Duration,
    /// Why the primary was considered lost.
    pub reason: String,
}

/// How far a pairing got towards protecting the VM: from its start to the
/// standby's first ack (time to protection).
#[derive(Debug, Clone, Copy)]
struct PairingClock {
    /// When the pairing started (before the handshake).
    started: Instant,
    /// The initial sync's pages, once done.
    sync: Option<(PrecopyReport, Duration)>,
}

/// A running VM and the machinery that protects it, with or without a
/// standby at the moment. `ctl protect` pairs it with a new one.
pub struct Runner {
    pub(super) vm: Vm,
    pub(super) shape: GuestShape,
    pub(super) console: Arc<HeldOutput>,
    pub(super) protection: Protection,
    pub(super) ft: FtOptions,
    pub(super) metrics: MetricsLog,
    pub(super) epoch: u64,
    pub(super) mailbox: Option<crate::api::Mailbox>,
    pub(super) user_paused: bool,
    /// "primary", or "standby (took over)".
    pub(super) role: &'static str,
    /// Set on a standby that took over.
    pub(super) took_over: Option<TookOver>,
    /// The wait's event sources; `None` after the protection changed.
    waiter: Option<Waiter>,
    /// Who decides role changes.
    pub(super) arbiter: Arbiter,
    /// The pairing in progress, until its first checkpoint is acked.
    pairing: Option<PairingClock>,
    /// Adaptive epochs: picks `ft.interval` after each epoch.
    pub(super) adaptive: Option<Controller>,
    /// The last epoch's cut, while epochs follow each other (an epoch's
    /// length for the controller); `None` after a gap.
    last_cut: Option<Instant>,
}

impl Runner {
    /// Wraps a built VM whose console writes through `console`.
    pub fn new(
        vm: Vm,
        shape: GuestShape,
        console: Arc<HeldOutput>,
        ft: FtOptions,
        mailbox: Option<crate::api::Mailbox>,
        role: &'static str,
    ) -> Result<Self, FtError> {
        let metrics = MetricsLog::new(&ft)?;
        let arbiter = match &ft.witness {
            Some(urls) => Arbiter::witness(
                urls,
                &ft.vm_id,
                format!("{role} (pid {})", std::process::id()),
            )?,
            None => Arbiter::none(),
        };
        let adaptive = ft.adaptive.map(Controller::new);
        let mut ft = ft;
        if let Some(a) = &adaptive {
            ft.interval = a.interval();
            let c = a.config();
            log::info!(
                "adaptive epochs: {} to {} ms, overhead budget {:.1} %, write fault {:.1} µs ({})",
                c.min.as_millis(),
                c.max.as_millis(),
                c.budget * 100.0,
                c.fault_cost.as_secs_f64() * 1e6,
                c.fault_source.as_str()
            );
        }
        Ok(Runner {
            adaptive,
            last_cut: None,
            arbiter,
            vm,
            shape,
            console,
            protection: Protection::Unprotected(None),
            ft,
            metrics,
            epoch: 0,
            mailbox,
            user_paused: false,
            role,
            took_over: None,
            waiter: None,
            pairing: None,
        })
    }

    /// Records how a standby took over (shown by `status`).
    pub fn with_took_over(mut self, t: TookOver) -> Self {
        self.took_over = Some(t);
        self
    }

    /// Pairs with the standby at `peer`: handshake, dirty tracking on,
    /// output held from now. The initial sync follows with
    /// [`Runner::initial_sync`] once the guest runs. On error nothing is
    /// held and the VM runs on as before.
    pub(super) fn connect(&mut self, peer: &str) -> Result<(), FtError> {
        let started = Instant::now();
        self.ft.peer = peer.to_string();
        if self.arbiter.witnessed() {
            // A new pairing is a role change: claim the next generation.
            match self.arbiter.claim(self.ft.generation) {
                Claim::Won(g) => self.ft.generation = g,
                Claim::Lost(r) => {
                    return Err(FtError::Outvoted {
                        generation: r.generation,
                        owner: r.owner,
                    })
                }
                Claim::Unreachable(e) => return Err(FtError::Witness(e)),
            }
        }
        let session = Box::new(Session::connect(&self.shape, &self.ft)?);
        log::info!(
            "protected by standby {peer} (generation {})",
            self.ft.generation
        );
        let Protection::Unprotected(kit) = &mut self.protection else {
            return Err(FtError::AlreadyProtected {
                peer: session.peer().to_string(),
            });
        };
        match kit {
            Some(kit) => kit.engine.restart_tracking(&self.vm)?,
            None => *kit = Some(Kit::new(&mut self.vm, &self.ft, &self.console)?),
        }
        let Protection::Unprotected(Some(kit)) =
            std::mem::replace(&mut self.protection, Protection::Unprotected(None))
        else {
            unreachable!("the kit was just made")
        };
        kit.outputs.hold();
        log::debug!(
            "pairing with {peer}: tracking on {:.1} ms after it began",
            started.elapsed().as_secs_f64() * 1e3
        );
        self.protection = Protection::Protected { session, kit };
        self.waiter = None;
        self.last_cut = None;
        if let Some(a) = &mut self.adaptive {
            a.reset();
        }
        self.pairing = Some(PairingClock {
            started,
            sync: None,
        });
        Ok(())
    }

    /// Live initial sync to the new standby (the guest runs meanwhile).
    pub(super) fn initial_sync(&mut self) -> Result<(), FtError> {
        let Protection::Protected { session, kit } = &mut self.protection else {
            return Ok(());
        };
        let t = Instant::now();
        log::debug!("initial sync begins");
        let (fault, generation) = (self.ft.fault, session.generation());
        let theirs = match self.ft.disk_sync {
            DiskSync::Hashes => Some(session.replica_hashes().to_vec()),
            DiskSync::Full => None,
        };
        let mut send = |frame: &CheckpointFrame<'_>| {
            session
                .send_checkpoint(frame, fault)
                .map_err(|loss| FtError::PeerLost(Box::new(loss)))
        };
        let disks = kit
            .engine
            .sync_disks(&self.vm, theirs.as_deref(), generation, |f| {
                send(f).map(drop)
            });
        let sent = disks.and_then(|d| {
            let pages = kit.engine.precopy(&self.vm, |staging| {
                send(&CheckpointFrame::new(staging, 0, generation))
            })?;
            Ok((d, pages))
        });
        match sent {
            Ok((d, pages)) => {
                if d.blocks > 0 {
                    log::info!(
                        target: crate::REPORT,
                        "disk sync ({:?}): {} of {} blocks sent ({} MiB) in {:.1} ms",
                        self.ft.disk_sync,
                        d.sent_blocks,
                        d.blocks,
                        d.bytes >> 20,
                        d.took.as_secs_f64() * 1e3
                    );
                }
                let took = t.elapsed();
                log::info!(
                    "initial sync: {} of {} pages sent in the first pass ({} never backed, {} zero), \
                     {} resent in {} rounds, {} MiB in {:.1} ms",
                    pages.bulk,
                    pages.pages,
                    pages.untouched,
                    pages.zero,
                    pages.resent,
                    pages.rounds,
                    pages.bytes >> 20,
                    took.as_secs_f64() * 1e3
                );
                if let Some(p) = &mut self.pairing {
                    p.sync = Some((pages, took));
                }
                Ok(())
            }
            Err(e) => self.lose_standby(PeerLoss::InitialSync(Box::new(e))),
        }
    }

    /// Pairs a running VM with a new standby (`ctl protect`).
    pub fn protect(&mut self, peer: &str) -> Result<(), FtError> {
        self.connect(peer)?;
        self.initial_sync()
    }

    /// The standby is gone, whichever way that showed. Before releasing
    /// anything, the heartbeat channel settles why: a standby that took over
    /// announced its new generation there (I5), and then this primary is
    /// fenced: it releases exactly what the standby committed, drops the
    /// rest, and stops. Otherwise it releases everything held and runs on
    /// unprotected, dirty tracking off.
    pub(super) fn lose_standby(&mut self, loss: PeerLoss) -> Result<(), FtError> {
        let Protection::Protected { session, kit } =
            std::mem::replace(&mut self.protection, Protection::Unprotected(None))
        else {
            return Ok(());
        };
        self.waiter = None;
        self.last_cut = None;
        let peer = session.peer().to_string();
        log::warn!("standby {peer} lost ({loss})");
        if let Some((generation, epoch)) = session.settle() {
            kit.outputs.release_upto(epoch);
            kit.outputs.discard_after(epoch);
            return Err(FtError::Fenced {
                peer,
                epoch,
                generation,
            });
        }
        self.decide(peer, kit)
    }

    /// After the standby's loss: go on unprotected only with the witness's
    /// word (g → g + 1 won), stop if the standby won it, and hold everything
    /// while the witness does not answer.
    fn decide(&mut self, peer: String, mut kit: Kit) -> Result<(), FtError> {
        match self.arbiter.claim(self.ft.generation) {
            Claim::Won(g) => {
                if self.arbiter.witnessed() {
                    log::warn!("the witness gave this primary generation {g}: running unprotected");
                    self.ft.generation = g;
                }
                log::warn!("standby {peer} lost: releasing held output, running unprotected");
                kit.outputs.release_all();
                kit.engine.stop_tracking(&self.vm);
                self.protection = Protection::Unprotected(Some(kit));
                Ok(())
            }
            Claim::Lost(r) => {
                let epoch = self.metrics.last.map(|m| m.epoch).unwrap_or(0);
                kit.outputs.discard_after(epoch);
                Err(FtError::Fenced {
                    peer: format!("{peer} (per the witness: owner {})", r.owner),
                    epoch,
                    generation: r.generation,
                })
            }
            Claim::Unreachable(e) => {
                if !matches!(self.protection, Protection::Deciding { .. }) {
                    log::warn!(
                        "standby {peer} lost and the witness unreachable ({e}): holding all output until it answers"
                    );
                }
                self.protection = Protection::Deciding { peer, kit };
                Ok(())
            }
        }
    }

    /// Runs until the guest ends.
    pub fn run(mut self) -> Result<VmExit, FtError> {
        let mut next_boundary = Instant::now() + self.ft.interval;
        loop {
            let exit = match self.wait(next_boundary)? {
                Wake::Api => {
                    self.serve_api();
                    continue;
                }
                Wake::Lost => {
                    if let Some(lost) = self.protection.session().and_then(Session::failure) {
                        self.lose_standby(PeerLoss::Heartbeat(lost))?;
                    }
                    continue;
                }
                Wake::Exit(r) => Some(r),
                Wake::Boundary => None,
            };
            if exit.is_none() && matches!(self.protection, Protection::Deciding { .. }) {
                if let Protection::Deciding { peer, kit } =
                    std::mem::replace(&mut self.protection, Protection::Unprotected(None))
                {
                    self.decide(peer, kit)?;
                }
                next_boundary = Instant::now() + RETRY;
                continue;
            }
            let protected = self.protection.session().is_some();
            if !protected || (self.user_paused && exit.is_none()) {
                if let Some(reason) = exit {
                    self.finish();
                    return Ok(reason);
                }
                next_boundary = Instant::now() + self.ft.interval.max(Duration::from_millis(50));
                self.last_cut = None;
                continue;
            }
            self.epoch += 1;
            // Epochs start on a fixed cadence: the next boundary counts from
            // this one, not from the end of this epoch's transfer and ack,
            // so output waits about half an interval plus the ack.
            let started = Instant::now();
            let length = self.last_cut.replace(started).map(|t| started - t);
            if let Err(loss) = self.run_epoch(length) {
                self.lose_standby(loss)?;
            }
            if let Some(reason) = exit {
                // The guest ended: its last output is committed (or
                // released, if the standby is gone); tell the standby not to
                // take over.
                if let Protection::Protected { session, kit } =
                    std::mem::replace(&mut self.protection, Protection::Unprotected(None))
                {
                    session.say_bye();
                    self.protection = Protection::Unprotected(Some(kit));
                }
                self.finish();
                return Ok(reason);
            }
            next_boundary = started + self.ft.interval;
        }
    }

    /// Waits for the next thing to do (see [`Waiter::wait`]).
    fn wait(&mut self, deadline: Instant) -> Result<Wake, FtError> {
        let rings = match &self.protection {
            Protection::Protected { kit, .. } if kit.engine.log.uses_rings() => {
                Some(self.vm.ring_full_event())
            }
            _ => None,
        };
        let waiter = match &mut self.waiter {
            Some(w) => w,
            None => {
                let protected = match &self.protection {
                    Protection::Protected { session, kit } => Some(wait::Protected {
                        session,
                        cut: kit.netbuf.cut_event(),
                        ring_full: rings,
                    }),
                    Protection::Unprotected(_) | Protection::Deciding { .. } => None,
                };
                let api = self.mailbox.as_ref().map(|m| m.event_fd());
                self.waiter.insert(Waiter::new(&self.vm, api, protected)?)
            }
        };
        Ok(waiter.wait(&self.vm, self.protection.session(), rings, deadline))
    }

    /// One epoch: pause, capture, resume, stream, await the ack, release;
    /// in adaptive mode, then the next epoch's length. `length`: since the
    /// previous epoch's cut, if it came just before.
    fn run_epoch(&mut self, length: Option<Duration>) -> Result<(), PeerLoss> {
        let Protection::Protected { session, kit } = &mut self.protection else {
            return Ok(());
        };
        let (epoch, ft) = (self.epoch, &self.ft);
        let c: Capture = kit
            .engine
            .capture(
                &mut self.vm,
                Some(&kit.outputs),
                epoch,
                ft.hash_epoch == Some(epoch),
            )
            .map_err(|e| PeerLoss::Local(Box::new(e)))?;
        // The guest runs again: encode, then stream.
        let t_resume = Instant::now();
        let enc = kit.engine.encode();
        let t_send = Instant::now();
        let encode = t_send - t_resume;
        let frame = kit.engine.frame(epoch, session.generation());
        let sent = session.send_checkpoint(&frame, ft.fault)?;
        let transfer = t_send.elapsed();
        if Fault::hits(ft.fault, FaultPoint::BeforeAck, epoch) {
            die_now("before ack");
        }
        // The ack: generous, since the heartbeat detects a dead standby
        // sooner and shuts the channel down, which ends this read at once.
        let ack_timeout = ft.heartbeat * HEARTBEAT_MISSES * 4 + Duration::from_secs(1);
        session.await_ack(epoch, ack_timeout)?;
        let ack_latency = t_resume.elapsed();
        if let Some(p) = self.pairing.take() {
            report_protected(session.peer(), p, epoch);
        }
        if Fault::hits(ft.fault, FaultPoint::DuringRelease, epoch) {
            self.console.release_half(epoch);
            die_now("during release");
        }
        kit.outputs.release_upto(epoch);
        kit.engine.trim();
        let interval = self.ft.interval;
        let mut overhead_ppm = 0;
        if let Some(a) = &mut self.adaptive {
            if let Some(length) = length {
                self.ft.interval = a.observe(&EpochSample {
                    length,
                    pause: c.pause,
                    dirty_pages: c.counts.total(),
                });
            }
            overhead_ppm = (a.estimate() * 1e6) as u64;
        }
        self.metrics.record(&EpochMetrics {
            bytes_sent: sent,
            transfer_us: transfer.as_micros() as u64,
            ack_latency_us: ack_latency.as_micros() as u64,
            encode_us: encode.as_micros() as u64,
            zero_pages: enc.zero,
            delta_pages: enc.delta,
            overhead_ppm,
            ..c.metrics(epoch, interval)
        });
        Ok(())
    }

    /// The guest ended: let out whatever is still held, log the summaries.
    fn finish(&mut self) {
        if let Protection::Deciding { kit, .. } = &self.protection {
            // Whether the standby took over is not known: nothing held may
            // go out (I5).
            kit.outputs
                .discard_after(self.metrics.last.map(|m| m.epoch).unwrap_or(0));
        }
        match self.protection.kit() {
            Some(kit) => kit.outputs.release_all(),
            None => self.console.release_all(),
        }
        self.metrics.log_summary(self.role);
        if let Some(kit) = self.protection.kit() {
            log_netbuf_summary(&*kit.netbuf);
        }
    }
}

/// The report line of a pairing whose first checkpoint was acked: the time
/// to protection and what the initial sync sent.
fn report_protected(peer: &str, p: PairingClock, epoch: u64) {
    let Some((sync, took)) = p.sync else {
        return;
    };
    log::info!(
        target: crate::REPORT,
        "protected by standby {peer} {:.1} ms after pairing began (checkpoint {epoch} acked); \
         initial sync {:.1} ms: {} MiB for {} of {} pages ({} never backed and {} zero not sent, \
         {} resent in {} rounds)",
        p.started.elapsed().as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e3,
        sync.bytes >> 20,
        sync.bulk + sync.resent,
        sync.pages,
        sync.untouched,
        sync.zero,
        sync.resent,
        sync.rounds,
    );
}
