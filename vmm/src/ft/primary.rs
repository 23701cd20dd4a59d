//! The primary: runs the guest and drives the epochs (DESIGN "The epoch").
//!
//! 0. Handshake, then a live initial sync (all memory, then rounds of the
//!    pages dirtied meanwhile) while the guest runs. Output is held from the
//!    start.
//! 1. At each epoch boundary every vCPU leaves `KVM_RUN` and saves its state.
//! 2. Harvest: KVM's dirty log (GET + CLEAR) OR the VMM's page bitmap.
//! 3. Copy the dirty pages and the encoded machine state into slab staging.
//! 4. Seal the epoch's output; new output goes to the next epoch.
//! 5. Resume the guest.
//! 6. Stream the checkpoint straight from the slabs.
//! 7. On the standby's ack, release the epoch's output.
//!
//! When the standby is lost the held output is released and the guest runs
//! on unprotected.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvmm_checkpoint::wire::{Ack, Limits, Message};
use ftvmm_checkpoint::{
    encode_state, CheckpointFrame, DevicesSummary, DirtyCounts, EpochMetrics, EpochWriter, Frame,
    FrameReader, GuestShape, HarvestBuffer, Hello, Role, Staging, StagingConfig, Summary,
    PAGE_SIZE, WIRE_VERSION,
};
use ftvmm_transport::{connect_pair, Channel, Heartbeat, HeartbeatHandle, TcpChannel};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::console::HeldOutput;
use super::{die_now, Fault, FaultPoint, FtError, FtOptions, HEARTBEAT_MISSES};
use crate::config::VmConfig;
use crate::dirty_log::DirtyLog;
use crate::memory;
use crate::vcpu::VmExit;
use crate::vm::{open_serial_output, Vm};
use ftvmm_netbuf::{Held, OutputCommit};

/// How long vCPUs get to acknowledge a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pages per frame of the initial sync.
const PRECOPY_BATCH: usize = 16 * 1024;
/// The initial sync stops iterating when a round dirtied fewer pages.
const PRECOPY_DONE_PAGES: usize = 2048;
/// Most dirty rounds of the initial sync.
const PRECOPY_MAX_ROUNDS: usize = 5;
/// Handshake timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The live link to the standby.
struct Session {
    chan: TcpChannel,
    hb: HeartbeatHandle,
    reader: FrameReader,
    /// Staging for control frames the standby sends (never checkpoints).
    ctl_staging: Staging,
    watcher_stop: Arc<AtomicBool>,
    peer: String,
}

impl Session {
    fn close(self) {
        self.watcher_stop.store(true, Ordering::Release);
        let _ = self.chan.shutdown();
        self.hb.stop();
    }
}

/// Shuts the data channel down when the heartbeat detector declares the
/// peer lost, so a blocked send or ack read returns at once.
fn spawn_failure_watcher(hb: &HeartbeatHandle, chan: &TcpChannel, stop: Arc<AtomicBool>) {
    let detector = hb.detector().clone();
    let Ok(chan) = chan.try_clone() else { return };
    let _ = std::thread::Builder::new()
        .name("ft-watch".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if let Some(lost) = detector.wait_failure(Duration::from_millis(200)) {
                    log::warn!("peer lost: {lost}");
                    let _ = chan.shutdown();
                    return;
                }
            }
        });
}

/// The guest's shape, as the standby must mirror it.
pub fn shape_of(config: &VmConfig) -> GuestShape {
    GuestShape {
        mem_bytes: config.mem_mib << 20,
        vcpus: u32::from(config.vcpus),
        cmdline: config.cmdline.clone(),
        devices: DevicesSummary {
            nic_macs: config
                .net
                .iter()
                .map(|n| n.mac.map(|m| m.0).unwrap_or([0; 6]))
                .collect(),
            disks: config.disks.len() as u32,
        },
    }
}

fn handshake(shape: &GuestShape, ft: &FtOptions) -> Result<Session, FtError> {
    let (mut chan, hb_stream) = connect_pair(ft.peer.as_str(), CONNECT_TIMEOUT)?;
    let hello = Message::Hello(Hello {
        version: WIRE_VERSION,
        generation: ft.generation,
        role: Role::Primary,
        heartbeat_ms: ft.heartbeat.as_millis().clamp(1, u32::MAX as u128) as u32,
        shape: shape.clone(),
    });
    let mut buf = Vec::new();
    ftvmm_checkpoint::wire::encode_message(&hello, &mut buf)?;
    chan.send_all(&buf)?;
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
    let reply = match reader.read_frame(&mut chan, &mut ctl_staging)? {
        Frame::Message(m) => m,
        Frame::Checkpoint(_) => {
            return Err(FtError::Protocol {
                peer: ft.peer.clone(),
                what: "standby sent a checkpoint during the handshake".into(),
            })
        }
    };
    match reply {
        Message::HelloAck(ack) if ack.generation == ft.generation => {}
        Message::HelloAck(ack) => {
            return Err(FtError::Protocol {
                peer: ft.peer.clone(),
                what: format!(
                    "standby accepted generation {} but this primary is generation {}",
                    ack.generation, ft.generation
                ),
            })
        }
        Message::Refuse(r) => {
            return Err(FtError::Refused {
                peer: ft.peer.clone(),
                reason: r.reason,
            })
        }
        other => {
            return Err(FtError::Protocol {
                peer: ft.peer.clone(),
                what: format!("unexpected {} in reply to Hello", other.kind().name()),
            })
        }
    }
    let hb = Heartbeat::start(hb_stream, ft.heartbeat, HEARTBEAT_MISSES, ft.generation)?;
    let watcher_stop = Arc::new(AtomicBool::new(false));
    spawn_failure_watcher(&hb, &chan, watcher_stop.clone());
    Ok(Session {
        chan,
        hb,
        reader,
        ctl_staging,
        watcher_stop,
        peer: ft.peer.clone(),
    })
}

/// Writes the first half of `frame`'s bytes, then dies (fault injection).
fn send_half_and_die(frame: &CheckpointFrame<'_>, chan: &mut TcpChannel, what: &str) -> ! {
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

/// What one checkpoint capture cost and produced.
#[derive(Debug, Clone, Copy)]
pub struct Capture {
    /// The guest was paused this long (pause → resume).
    pub pause: Duration,
    /// Of which: stopping the vCPUs and devices, and waiting for whatever
    /// of their state capture did not overlap the page copy.
    pub save: Duration,
    /// Of which: encoding and staging the machine state (and sealing).
    pub encode: Duration,
    /// Of which: reading and clearing KVM's dirty log and merging it with the
    /// VMM's bitmap.
    pub harvest: Duration,
    /// Of which: copying the pages into the staging.
    pub stage: Duration,
    /// Dirty pages, by source.
    pub counts: DirtyCounts,
    /// What was staged.
    pub stats: ftvmm_checkpoint::EpochStats,
    /// Console bytes sealed for this epoch.
    pub held: usize,
    /// Network frames sealed for this epoch.
    pub net_held: Held,
}

/// The epoch machinery of the primary: dirty log, harvest buffers, staging.
pub struct Engine {
    pub(crate) log: DirtyLog,
    harvests: Vec<HarvestBuffer>,
    staging: Staging,
    state_buf: Vec<u8>,
    region_bases: Vec<u64>,
    /// The network output commit, sealed with the console.
    netbuf: Option<Arc<dyn OutputCommit>>,
}

impl Engine {
    /// Turns on dirty logging for `vm` (manual protect) and allocates the
    /// harvest buffers and the staging.
    pub fn new(vm: &mut Vm) -> Result<Self, FtError> {
        let rings = vm.take_dirty_rings();
        let log = if rings.is_empty() {
            DirtyLog::new(&vm.fd, &vm.memory)?
        } else {
            DirtyLog::with_rings(&vm.memory, rings)
        };
        memory::register_slots(&vm.fd, &vm.memory, true).map_err(crate::vm::VmError::from)?;
        let harvests = vm
            .memory
            .iter()
            .map(|r| HarvestBuffer::new((r.len() / PAGE_SIZE as u64) as usize))
            .collect();
        let region_bases = vm.memory.iter().map(|r| r.start_addr().0).collect();
        let staging = Staging::new(StagingConfig::for_guest(
            memory::page_count(&vm.memory) * PAGE_SIZE as u64,
        ))?;
        Ok(Engine {
            log,
            harvests,
            staging,
            state_buf: Vec::with_capacity(64 * 1024),
            region_bases,
            netbuf: None,
        })
    }

    /// Harvests the dirty set (KVM log OR the VMM's bitmap) into the
    /// harvest buffers. With vCPUs running, this is a pre-copy round; paused,
    /// an exact epoch cut.
    fn harvest(&mut self, vm: &Vm) -> Result<DirtyCounts, FtError> {
        self.log.harvest(&vm.fd)?;
        let mut counts = DirtyCounts::default();
        for (i, region) in vm.memory.iter().enumerate() {
            counts
                .add(self.harvests[i].harvest(&self.log.slots[i].bitmap, region.deref().bitmap())?);
        }
        Ok(counts)
    }

    /// Steps 1–5 of an epoch: pause the vCPUs and devices, capture the
    /// machine state and the dirty pages into the staging, seal the
    /// console's output, resume. The checkpoint is then in
    /// [`Engine::staging`], ready to stream.
    pub fn capture(
        &mut self,
        vm: &mut Vm,
        console: Option<&HeldOutput>,
        epoch: u64,
        hash: bool,
    ) -> Result<Capture, FtError> {
        let t_pause = Instant::now();
        // Stop the guest; its vCPU threads go on saving their registers
        // while this thread harvests and copies the dirty pages.
        vm.begin_save(PAUSE_TIMEOUT)?;
        let t_harvest = Instant::now();
        let counts = self.harvest(vm)?;
        let t_stage = Instant::now();
        let Engine {
            staging,
            harvests,
            region_bases,
            state_buf,
            ..
        } = self;
        let mut w = staging.begin_epoch();
        stage_pages(vm, harvests, region_bases, &mut w, PageCopy::Paused)?;
        let t_save = Instant::now();
        let state = vm.finish_save(PAUSE_TIMEOUT)?;
        let t_encode = Instant::now();
        encode_state(&state, state_buf)?;
        w.stage_state(state_buf)?;
        let stats = w.finish();
        let held = console.map(|c| c.seal(epoch)).unwrap_or(0);
        let net_held = self
            .netbuf
            .as_ref()
            .map(|n| n.seal(epoch))
            .unwrap_or_default();
        if hash {
            eprintln!(
                "ftvmm: memory crc at epoch {epoch}: {:08x}",
                super::memory_crc(&vm.memory)
            );
        }
        let t_done = Instant::now();
        vm.resume();
        Ok(Capture {
            pause: t_pause.elapsed(),
            save: (t_harvest - t_pause) + (t_encode - t_save),
            encode: t_done - t_encode,
            harvest: t_stage - t_harvest,
            stage: t_save - t_stage,
            counts,
            stats,
            held,
            net_held,
        })
    }

    /// The staged checkpoint.
    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    /// Guest-physical addresses of the pages of the last capture.
    pub fn dirty_gpas(&self) -> impl Iterator<Item = u64> + '_ {
        self.harvests
            .iter()
            .zip(&self.region_bases)
            .flat_map(|(h, base)| h.pages().map(move |p| base + p as u64 * PAGE_SIZE as u64))
    }

    /// Lets the staging give back slabs a smaller checkpoint no longer needs
    /// (after the checkpoint was sent).
    pub fn trim(&mut self) {
        self.staging.trim();
    }
}

/// How the pages are read from guest memory while staging.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageCopy {
    /// The guest runs (pre-copy): volatile reads through vm-memory.
    Live,
    /// vCPUs and devices are paused: nothing writes guest memory, so each
    /// page is one plain memcpy (vm-memory's volatile copy is ≈1.5× slower,
    /// measured by the `ft` benchmark).
    Paused,
}

/// Copies the harvested pages into the epoch being staged.
fn stage_pages(
    vm: &Vm,
    harvests: &[HarvestBuffer],
    region_bases: &[u64],
    w: &mut EpochWriter<'_>,
    copy: PageCopy,
) -> Result<(), FtError> {
    for (h, base) in harvests.iter().zip(region_bases) {
        let host = vm
            .memory
            .get_host_address(GuestAddress(*base))
            .map_err(|e| FtError::GuestMemory {
                gpa: *base,
                reason: e.to_string(),
            })?;
        for page in h.pages() {
            let gpa = base + page as u64 * PAGE_SIZE as u64;
            let slot = w.page_slot(gpa)?;
            match copy {
                PageCopy::Paused => {
                    // SAFETY: `page` is a page of the region that starts at
                    // `base` (the harvest buffer is sized to it), so the 4 KiB
                    // at host + page × 4096 are mapped for the region's
                    // lifetime; nothing writes them concurrently because every
                    // vCPU is out of KVM_RUN and every device is paused; the
                    // slot is a distinct staging buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            host.add(page * PAGE_SIZE),
                            slot.as_mut_ptr(),
                            PAGE_SIZE,
                        )
                    }
                }
                PageCopy::Live => vm
                    .memory
                    .read_slice(&mut slot[..], GuestAddress(gpa))
                    .map_err(|e| FtError::GuestMemory {
                        gpa,
                        reason: e.to_string(),
                    })?,
            }
        }
    }
    Ok(())
}

/// Sends every page of guest memory, in batches, while the guest runs.
fn precopy(
    vm: &Vm,
    engine: &mut Engine,
    session: &mut Session,
    ft: &FtOptions,
) -> Result<(), FtError> {
    let t = Instant::now();
    let mut sent_pages = 0u64;
    let mut first = true;
    // Round 0: all of memory. The dirty log is already on, so anything the
    // guest writes while we copy is sent again in the next rounds.
    for (region, base) in vm.memory.iter().zip(engine.region_bases.clone()) {
        let pages = (region.len() / PAGE_SIZE as u64) as usize;
        let mut start = 0;
        while start < pages {
            let end = (start + PRECOPY_BATCH).min(pages);
            let mut w = engine.staging.begin_epoch();
            for page in start..end {
                let gpa = base + (page * PAGE_SIZE) as u64;
                let slot = w.page_slot(gpa)?;
                vm.memory
                    .read_slice(&mut slot[..], GuestAddress(gpa))
                    .map_err(|e| FtError::GuestMemory {
                        gpa,
                        reason: e.to_string(),
                    })?;
            }
            w.finish();
            let frame = CheckpointFrame::new(&engine.staging, 0, ft.generation);
            if first && Fault::hits(ft.fault, FaultPoint::InitialSync, 0) {
                send_half_and_die(&frame, &mut session.chan, "initial sync");
            }
            first = false;
            frame.write_to(&mut session.chan)?;
            sent_pages += (end - start) as u64;
            start = end;
        }
    }
    // Dirty rounds until the remainder is small.
    for round in 1..=PRECOPY_MAX_ROUNDS {
        let counts = engine.harvest(vm)?;
        let mut w = engine.staging.begin_epoch();
        stage_pages(
            vm,
            &engine.harvests,
            &engine.region_bases,
            &mut w,
            PageCopy::Live,
        )?;
        w.finish();
        CheckpointFrame::new(&engine.staging, 0, ft.generation).write_to(&mut session.chan)?;
        sent_pages += counts.total();
        log::info!("initial sync round {round}: {} dirty pages", counts.total());
        if (counts.total() as usize) < PRECOPY_DONE_PAGES {
            break;
        }
    }
    log::info!(
        "initial sync: {sent_pages} pages in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Per-epoch metrics sink: JSON lines and the run's summary.
struct MetricsLog {
    file: Option<BufWriter<File>>,
    summary: Summary,
    last: Option<EpochMetrics>,
}

impl MetricsLog {
    fn new(ft: &FtOptions) -> Result<Self, FtError> {
        let file = match &ft.metrics_path {
            Some(p) => Some(BufWriter::new(File::create(p).map_err(|source| {
                FtError::Metrics {
                    path: p.display().to_string(),
                    source,
                }
            })?)),
            None => None,
        };
        Ok(MetricsLog {
            file,
            summary: Summary::new(),
            last: None,
        })
    }

    fn record(&mut self, m: &EpochMetrics) {
        self.summary.record(m);
        self.last = Some(*m);
        if let Some(f) = &mut self.file {
            if serde_json::to_writer(&mut *f, m).is_ok() {
                let _ = f.write_all(b"\n");
                let _ = f.flush();
            }
        }
    }

    fn print_summary(&self, side: &str) {
        if self.summary.count() == 0 {
            return;
        }
        let r = self.summary.report();
        eprintln!(
            "ftvmm: {side}: {} epochs; pause µs median {} p99 {} max {}; dirty pages median {} max {}; \
             transfer µs median {}; ack latency µs median {} p99 {}; {} MiB sent",
            r.epochs,
            r.pause_us.median,
            r.pause_us.p99,
            r.pause_us.max,
            r.dirty_pages.median,
            r.dirty_pages.max,
            r.transfer_us.median,
            r.ack_latency_us.median,
            r.ack_latency_us.p99,
            r.total_bytes_sent >> 20
        );
    }
}

/// Outcome of one epoch.
enum EpochResult {
    Committed,
    StandbyLost(String),
}

/// Why [`wait_boundary`] returned.
enum Wake {
    /// The guest ended.
    Exit(VmExit),
    /// The epoch boundary (or an early cut) came.
    Boundary,
    /// The standby was declared lost.
    Lost,
    /// A control request waits.
    Api,
}

/// A running VM and the machinery that protects it: the epoch loop of a
/// primary, and equally of a standby that took over (same code path), with
/// or without a standby at the moment. `ctl protect` pairs it with a new one.
pub struct Runner {
    vm: Vm,
    shape: GuestShape,
    console: Arc<HeldOutput>,
    netbuf: Option<Arc<dyn OutputCommit>>,
    engine: Option<Engine>,
    session: Option<Session>,
    ft: FtOptions,
    metrics: MetricsLog,
    last: Option<EpochMetrics>,
    epoch: u64,
    mailbox: Option<crate::api::Mailbox>,
    user_paused: bool,
    /// "primary", or "standby (took over)".
    role: &'static str,
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
        Ok(Runner {
            vm,
            shape,
            console,
            netbuf: None,
            engine: None,
            session: None,
            ft,
            metrics,
            last: None,
            epoch: 0,
            mailbox,
            user_paused: false,
            role,
        })
    }

    /// Pairs with the standby at `peer`: handshake, dirty tracking on,
    /// output held from now. The initial sync follows with
    /// [`Runner::initial_sync`] once the guest runs.
    fn connect(&mut self, peer: &str) -> Result<(), FtError> {
        self.ft.peer = peer.to_string();
        let session = handshake(&self.shape, &self.ft)?;
        log::info!(
            "protected by standby {peer} (generation {})",
            self.ft.generation
        );
        if self.netbuf.is_none() {
            self.netbuf = Some(start_netbuf(&self.vm, &self.ft)?);
        }
        match &mut self.engine {
            None => self.engine = Some(Engine::new(&mut self.vm)?),
            Some(_) => {
                memory::register_slots(&self.vm.fd, &self.vm.memory, true)
                    .map_err(crate::vm::VmError::from)?;
            }
        }
        let engine = self.engine.as_mut().expect("just set");
        engine.netbuf = self.netbuf.clone();
        self.console.hold();
        if let Some(n) = &self.netbuf {
            n.hold();
        }
        self.session = Some(session);
        Ok(())
    }

    /// Live initial sync to the new standby (the guest runs meanwhile).
    fn initial_sync(&mut self) -> Result<(), FtError> {
        if let (Some(s), Some(engine)) = (self.session.as_mut(), self.engine.as_mut()) {
            if let Err(e) = precopy(&self.vm, engine, s, &self.ft) {
                self.lose_standby(&e.to_string())?;
            }
        }
        Ok(())
    }

    /// Pairs a running VM with a new standby (`ctl protect`).
    pub fn protect(&mut self, peer: &str) -> Result<(), FtError> {
        self.connect(peer)?;
        self.initial_sync()
    }

    fn lose_standby(&mut self, why: &str) -> Result<(), FtError> {
        let none: Arc<dyn OutputCommit> = Arc::new(ftvmm_netbuf::PassThrough);
        let netbuf = self.netbuf.clone().unwrap_or(none);
        let r = lose_standby(&mut self.session, &self.console, &*netbuf, &self.vm, why);
        // Dirty logging is off now; empty the rings so no vCPU waits on a
        // full one.
        if let Some(e) = self.engine.as_mut().filter(|e| e.log.uses_rings()) {
            if let Err(err) = e.log.harvest(&self.vm.fd) {
                log::warn!("cannot drain the dirty rings: {err}");
            }
        }
        r
    }

    /// Runs until the guest ends.
    pub fn run(mut self) -> Result<VmExit, FtError> {
        let mut next_boundary = Instant::now() + self.ft.interval;
        loop {
            let cut = self.netbuf.as_ref().and_then(|n| n.cut_event());
            let rings = self
                .engine
                .as_ref()
                .filter(|e| e.log.uses_rings())
                .map(|_| self.vm.ring_full_event());
            let wake = wait_boundary(
                &self.vm,
                self.session.as_ref(),
                cut,
                rings,
                self.mailbox.as_ref().map(|m| m.event_fd()),
                next_boundary,
            );
            let exit = match wake {
                Wake::Api => {
                    self.serve_api();
                    continue;
                }
                Wake::Lost => {
                    let why = self
                        .session
                        .as_ref()
                        .and_then(|s| s.hb.failure())
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "lost".into());
                    self.lose_standby(&why)?;
                    continue;
                }
                Wake::Exit(r) => Some(r),
                Wake::Boundary => None,
            };
            if self.session.is_none() || (self.user_paused && exit.is_none()) {
                if let Some(reason) = exit {
                    self.finish();
                    return Ok(reason);
                }
                next_boundary = Instant::now() + self.ft.interval.max(Duration::from_millis(50));
                continue;
            }
            self.epoch += 1;
            let epoch = self.epoch;
            // Epochs start on a fixed cadence: the next boundary counts from
            // this one, not from the end of this epoch's transfer and ack,
            // so output waits about half an interval plus the ack.
            let started = Instant::now();
            let netbuf = self.netbuf.clone().expect("a protected VM has a netbuf");
            let result = run_epoch(
                &mut self.vm,
                self.engine.as_mut().expect("a protected VM has an engine"),
                self.session.as_mut().expect("protected"),
                &self.console,
                &*netbuf,
                &self.ft,
                epoch,
                &mut self.metrics,
            );
            match result {
                Ok(EpochResult::Committed) => {
                    self.last = self.metrics.last;
                }
                Ok(EpochResult::StandbyLost(why)) => self.lose_standby(&why)?,
                Err(e) => {
                    // A local failure (pause timeout, memory read) is not the
                    // standby's fault, but the checkpoint stream cannot go on.
                    self.vm.resume();
                    self.lose_standby(&e.to_string())?;
                }
            }
            if let Some(reason) = exit {
                // The guest ended: its last output is committed (or
                // released, if the standby is gone); tell the standby not to
                // take over.
                if let Some(mut s) = self.session.take() {
                    let mut buf = Vec::new();
                    if ftvmm_checkpoint::wire::encode_message(&Message::Bye, &mut buf).is_ok() {
                        let _ = s.chan.send_all(&buf);
                    }
                    s.close();
                }
                self.finish();
                return Ok(reason);
            }
            next_boundary = started + self.ft.interval;
        }
    }

    fn finish(&mut self) {
        self.console.release_all();
        if let Some(n) = &self.netbuf {
            n.release_all();
        }
        self.metrics.print_summary(self.role);
        if let Some(n) = &self.netbuf {
            print_netbuf_summary(&**n);
        }
    }

    fn serve_api(&mut self) {
        let Some(req) = self.mailbox.as_ref().and_then(|m| m.next()) else {
            return;
        };
        let (req, reply) = req;
        let resp = self.handle(req);
        let _ = reply.send(resp);
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "role": self.role,
            "protected": self.session.is_some(),
            "peer": self.session.as_ref().map(|s| s.peer.clone()),
            "generation": self.ft.generation,
            "epoch": self.epoch,
            "interval_ms": self.ft.interval.as_millis() as u64,
            "paused": self.user_paused,
            "mem_bytes": self.shape.mem_bytes,
            "vcpus": self.shape.vcpus,
        })
    }

    fn handle(&mut self, req: crate::api::Request) -> crate::api::Response {
        use crate::api::{Request, Response};
        match req {
            Request::Status => Response::ok(self.status()),
            Request::Stats => Response::ok(serde_json::json!({
                "status": self.status(),
                "summary": self.metrics.summary.report(),
                "last_epoch": self.last,
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
            Request::Protect { .. } if self.session.is_some() => Response::error(format!(
                "already protected by standby {}",
                self.session
                    .as_ref()
                    .map(|s| s.peer.as_str())
                    .unwrap_or("?")
            )),
            Request::Protect { .. } if self.user_paused => {
                Response::error("resume the guest before protecting it")
            }
            Request::Protect { peer } => match self.protect(&peer) {
                Ok(()) if self.session.is_some() => Response::ok(self.status()),
                Ok(()) => {
                    Response::error(format!("standby {peer} was lost during the initial sync"))
                }
                Err(e @ FtError::Fenced { .. }) => Response::error(e.to_string()),
                Err(e) => {
                    // Nothing was committed: output flows as before.
                    self.session = None;
                    self.console.release_all();
                    if let Some(n) = &self.netbuf {
                        n.release_all();
                    }
                    Response::error(format!("cannot protect with {peer}: {e}"))
                }
            },
            Request::SetIntervalMs { ms } if (1..=60_000).contains(&ms) => {
                self.ft.interval = Duration::from_millis(ms);
                Response::ok(self.status())
            }
            Request::SetIntervalMs { ms } => {
                Response::error(format!("interval-ms {ms} is out of range (1 to 60000)"))
            }
        }
    }
}

/// Boots `config`'s guest and runs it until it ends: protected by the
/// standby at `peer` if given, and with a control API if `mailbox` is given
/// (whose `protect` request can pair it with a standby later).
pub fn run_vm(
    config: &VmConfig,
    ft: &FtOptions,
    peer: Option<&str>,
    mailbox: Option<crate::api::Mailbox>,
) -> Result<VmExit, FtError> {
    let console = HeldOutput::new(open_serial_output(&config.serial)?);
    let vm = Vm::create_with_output(config, console.writer())?;
    vm.boot(config)?;
    let mut runner = Runner::new(
        vm,
        shape_of(config),
        console,
        ft.clone(),
        mailbox,
        "primary",
    )?;
    // Before the guest runs: a primary whose standby cannot be reached
    // fails here, with nothing released.
    if let Some(peer) = peer {
        runner.connect(peer)?;
    }
    runner.vm.start()?;
    runner.initial_sync()?;
    runner.run()
}

/// The network output commit (DESIGN "Output commit"): the backend, with
/// each NIC's transmit sink replaced where the backend holds frames itself.
fn start_netbuf(vm: &Vm, ft: &FtOptions) -> Result<Arc<dyn OutputCommit>, FtError> {
    let taps = (0..vm.devices.net().len())
        .filter_map(|i| vm.devices.net_tap(i))
        .collect::<std::io::Result<Vec<_>>>()?;
    let (netbuf, sinks) = ftvmm_netbuf::create(&ft.netbuf, &taps)?;
    for (i, sink) in sinks.into_iter().enumerate() {
        if let Some(sink) = sink {
            vm.devices.set_net_sink(i, sink);
        }
    }
    Ok(netbuf)
}

/// The netbuf's line of the run summary, with the held-time histogram.
fn print_netbuf_summary(netbuf: &dyn OutputCommit) {
    let r = netbuf.report();
    if r.frames_held == 0 {
        return;
    }
    eprintln!(
        "ftvmm: netbuf {}: {} frames ({} KiB) held, {} released, {} discarded; held µs median {} p99 {} max {}; \
         {} early cuts, {} backpressure waits, {} over limit, peak {} of {} KiB",
        netbuf.backend(),
        r.frames_held,
        r.bytes_held >> 10,
        r.frames_released,
        r.frames_discarded,
        r.held_us.median,
        r.held_us.p99,
        r.held_us.max,
        r.early_cuts,
        r.backpressure_waits,
        r.over_limit,
        r.peak_bytes >> 10,
        r.limit_bytes >> 10,
    );
}

/// Waits until `deadline`, the guest's end, the standby's loss, an early
/// cut asked by the netbuf (`cut` readable), or a control request (`api`
/// readable).
fn wait_boundary(
    vm: &Vm,
    session: Option<&Session>,
    cut: Option<&vmm_sys_util::eventfd::EventFd>,
    ring_full: Option<&vmm_sys_util::eventfd::EventFd>,
    api: Option<&vmm_sys_util::eventfd::EventFd>,
    deadline: Instant,
) -> Wake {
    let cut = cut.filter(|_| session.is_some());
    loop {
        if let Some(r) = vm.exit_reason() {
            return Wake::Exit(r);
        }
        if session.is_some_and(|s| s.hb.failure().is_some()) {
            return Wake::Lost;
        }
        let now = Instant::now();
        if now >= deadline {
            return Wake::Boundary;
        }
        let fd = |e: &vmm_sys_util::eventfd::EventFd| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // [exit, reset, heartbeat?, cut?, api?] — indices fixed below.
        let mut fds: Vec<libc::pollfd> = vm.exit_fds().iter().map(|e| fd(e)).collect();
        if let Some(s) = session {
            fds.push(fd(s.hb.event_fd()));
        }
        let cut_at = cut.map(|c| {
            fds.push(fd(c));
            fds.len() - 1
        });
        let ring_at = ring_full.filter(|_| session.is_some()).map(|r| {
            fds.push(fd(r));
            fds.len() - 1
        });
        let api_at = api.map(|a| {
            fds.push(fd(a));
            fds.len() - 1
        });
        // ppoll: microsecond precision (poll's milliseconds would make
        // every epoch up to 1 ms late, which output commit pays directly).
        let left = deadline - now;
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of pollfd and `ts` a valid timespec,
        // both outliving the call; no signal mask is passed.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if n <= 0 {
            continue;
        }
        if api_at.is_some_and(|i| fds[i].revents != 0) {
            return Wake::Api;
        }
        if ring_at.is_some_and(|i| fds[i].revents != 0) {
            // A vCPU's dirty ring is full: harvest now.
            let _ = ring_full.map(|r| r.read());
            return Wake::Boundary;
        }
        if cut_at.is_some_and(|i| fds[i].revents != 0) {
            // Sealing the epoch clears the request.
            return Wake::Boundary;
        }
    }
}

/// The standby stopped answering. Before releasing anything, let the
/// heartbeat channel settle why: a standby that took over announces its new
/// generation there before closing (I5), and then this primary is fenced: it
/// releases only what the standby committed, drops the rest, and stops its
/// guest. Otherwise the standby is gone: release everything held and run on
/// unprotected.
fn lose_standby(
    session: &mut Option<Session>,
    console: &HeldOutput,
    netbuf: &dyn OutputCommit,
    vm: &Vm,
    why: &str,
) -> Result<(), FtError> {
    if let Some(s) = session.take() {
        // Read everything the standby sent before it went (its heartbeat
        // stream ends with a takeover notice if it took over), bounded by
        // the silence timeout for a standby whose host vanished.
        let detector = s.hb.detector().clone();
        let settle = detector.timeout() + Duration::from_millis(100);
        if !detector.wait_receiver_done(settle) {
            log::warn!(
                "heartbeat channel of {} did not settle within {settle:?}",
                s.peer
            );
        }
        let peer = s.peer.clone();
        s.close();
        if let Some((generation, epoch)) = detector.fenced_by() {
            // Release exactly what the standby committed; drop the rest.
            console.release_upto(epoch);
            console.discard_after(epoch);
            netbuf.release_upto(epoch);
            netbuf.discard_after(epoch);
            return Err(FtError::Fenced {
                peer,
                epoch,
                generation,
            });
        }
        log::warn!("standby {peer} lost ({why}): releasing held output, running unprotected");
    }
    console.release_all();
    netbuf.release_all();
    if let Err(e) = memory::register_slots(&vm.fd, &vm.memory, false) {
        log::warn!("cannot turn dirty logging off: {e}");
    }
    Ok(())
}

/// One epoch: pause, capture, resume, stream, await the ack, release.
#[allow(clippy::too_many_arguments)]
fn run_epoch(
    vm: &mut Vm,
    engine: &mut Engine,
    s: &mut Session,
    console: &HeldOutput,
    netbuf: &dyn OutputCommit,
    ft: &FtOptions,
    epoch: u64,
    metrics: &mut MetricsLog,
) -> Result<EpochResult, FtError> {
    let Capture {
        pause,
        counts,
        stats,
        held,
        net_held,
        ..
    } = engine.capture(vm, Some(console), epoch, ft.hash_epoch == Some(epoch))?;

    let frame = CheckpointFrame::new(&engine.staging, epoch, ft.generation);
    if Fault::hits(ft.fault, FaultPoint::MidCheckpoint, epoch) {
        send_half_and_die(&frame, &mut s.chan, "mid-checkpoint");
    }
    let t_send = Instant::now();
    let sent = match frame.write_to(&mut s.chan) {
        Ok(n) => n,
        Err(e) => {
            return Ok(EpochResult::StandbyLost(format!(
                "sending checkpoint {epoch}: {e}"
            )))
        }
    };
    let transfer = t_send.elapsed();
    if Fault::hits(ft.fault, FaultPoint::BeforeAck, epoch) {
        die_now("before ack");
    }
    s.hb.set_epoch(epoch);

    // The ack: generous, since the heartbeat detects a dead standby sooner
    // and shuts the channel down, which ends this read at once.
    let ack_timeout = ft.heartbeat * HEARTBEAT_MISSES * 4 + Duration::from_secs(1);
    if let Err(e) = s.chan.set_read_timeout(Some(ack_timeout)) {
        return Ok(EpochResult::StandbyLost(e.to_string()));
    }
    match s.reader.read_frame(&mut s.chan, &mut s.ctl_staging) {
        Ok(Frame::Message(Message::Ack(Ack {
            epoch: e,
            generation: g,
        }))) if e == epoch && g == ft.generation => {}
        Ok(Frame::Message(Message::Ack(a))) => {
            return Ok(EpochResult::StandbyLost(format!(
                "ack for epoch {} generation {} while waiting for epoch {epoch} generation {}",
                a.epoch, a.generation, ft.generation
            )))
        }
        Ok(Frame::Message(other)) => {
            return Ok(EpochResult::StandbyLost(format!(
                "{} while waiting for the ack of epoch {epoch}",
                other.kind().name()
            )))
        }
        Ok(Frame::Checkpoint(_)) => {
            return Ok(EpochResult::StandbyLost("standby sent a checkpoint".into()))
        }
        Err(e) => {
            return Ok(EpochResult::StandbyLost(format!(
                "waiting for the ack of epoch {epoch}: {e}"
            )))
        }
    }
    let ack_latency = t_send.elapsed();
    if Fault::hits(ft.fault, FaultPoint::DuringRelease, epoch) {
        console.release_prefix(epoch, held / 2);
        die_now("during release");
    }
    console.release_upto(epoch);
    netbuf.release_upto(epoch);
    engine.trim();
    metrics.record(&EpochMetrics {
        epoch,
        pause_us: pause.as_micros() as u64,
        dirty_vcpu: counts.vcpu_only,
        dirty_vmm: counts.vmm_only,
        dirty_both: counts.both,
        bytes_staged: stats.payload_bytes as u64,
        bytes_sent: sent,
        transfer_us: transfer.as_micros() as u64,
        ack_latency_us: ack_latency.as_micros() as u64,
        held_packets: net_held.frames,
        held_bytes: held as u64 + net_held.bytes,
        slabs: stats.slabs_used as u64,
    });
    Ok(EpochResult::Committed)
}
