//! The primary's checkpoint machinery: dirty log, harvest buffers and slab
//! staging; the epoch capture (steps 1–5 of docs/design.md "The epoch"), the
//! page encoding after it, and the staging of the initial sync.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::encoding::is_zero;
use ftvmm_checkpoint::{
    encode_state, CheckpointFrame, DirtyCounts, EncodeStats, Encoder, EpochMetrics, EpochWriter,
    HarvestBuffer, Staging, StagingConfig, DEFAULT_CACHE_BYTES, PAGE_SIZE,
};
use ftvmm_devices::virtio::block::JournalCounts;
use ftvmm_netbuf::{Held, OutputCommit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::disk::DiskJournals;
use super::FtError;
use crate::dirty_log::DirtyLog;
use crate::memory;
use crate::pagemap::Pagemap;
use crate::vm::Vm;

/// How long vCPUs get to acknowledge a pause.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pages per frame of the initial sync (8 MiB: the standby applies one frame
/// while the next is read and sent).
const PRECOPY_BATCH: usize = 2048;
/// Pages whose backing one read of the page map looks up.
const PAGEMAP_CHUNK: usize = 16 * 1024;
/// The initial sync stops iterating when a round dirtied fewer pages.
const PRECOPY_DONE_PAGES: usize = 2048;
/// Most dirty rounds of the initial sync.
const PRECOPY_MAX_ROUNDS: usize = 5;

/// A paused VM: every vCPU and device is resumed when this guard goes,
/// whichever way the capture ends (an early error included).
struct Paused<'a>(&'a mut Vm);

impl Deref for Paused<'_> {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.0
    }
}

impl DerefMut for Paused<'_> {
    fn deref_mut(&mut self) -> &mut Vm {
        self.0
    }
}

impl Paused<'_> {
    /// Resumes the VM now; returns when its vCPUs were released
    /// ([`Vm::resume`]).
    fn resume(self) -> Instant {
        let this = std::mem::ManuallyDrop::new(self);
        this.0.resume()
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// What one checkpoint capture cost and produced.
#[derive(Debug, Clone, Copy)]
pub struct Capture {
    /// The guest was paused this long: from the pause request until every
    /// vCPU was released to run again (one wake-up for all, [`Vm::resume`];
    /// when each then gets a CPU is the host scheduler's business).
    pub pause: Duration,
    /// Of which: from the pause request until every vCPU was out of
    /// `KVM_RUN` (the kick) and every device quiesced.
    pub stop: Duration,
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
    /// Output sealed for this epoch (console bytes and network frames).
    pub held: Held,
    /// The disks' writes and flushes of this epoch.
    pub disk: JournalCounts,
}

impl Capture {
    /// The epoch's metrics as far as the capture knows them (of an epoch
    /// of length `interval`); the stream's and the ack's are left zero.
    pub fn metrics(&self, epoch: u64, interval: Duration) -> EpochMetrics {
        EpochMetrics {
            epoch,
            pause_us: self.pause.as_micros() as u64,
            dirty_vcpu: self.counts.vcpu_only,
            dirty_vmm: self.counts.vmm_only,
            dirty_both: self.counts.both,
            bytes_staged: self.stats.payload_bytes as u64,
            held_packets: self.held.frames,
            held_bytes: self.held.bytes,
            slabs: self.stats.slabs_used as u64,
            disk_writes: self.disk.writes,
            disk_bytes: self.disk.write_bytes,
            disk_flushes: self.disk.flushes,
            interval_us: interval.as_micros() as u64,
            ..EpochMetrics::default()
        }
    }
}

/// What the initial sync's memory pre-copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrecopyReport {
    /// Pages of guest memory.
    pub pages: u64,
    /// Pages the host never backed: zero, skipped without being read.
    pub untouched: u64,
    /// Pages read and found zero: not sent (the standby's memory starts zero).
    pub zero: u64,
    /// Pages sent by the first pass over all of memory.
    pub bulk: u64,
    /// Pages sent again by the later rounds (dirtied meanwhile).
    pub resent: u64,
    /// Rounds after the first pass.
    pub rounds: u32,
    /// Bytes of the frames sent.
    pub bytes: u64,
}

/// The epoch machinery of the primary: dirty log, harvest buffers, staging,
/// page encoder.
pub struct Engine {
    pub(crate) log: DirtyLog,
    harvests: Vec<HarvestBuffer>,
    staging: Staging,
    state_buf: Vec<u8>,
    region_bases: Vec<u64>,
    disks: DiskJournals,
    encoder: Encoder,
    cache_bytes: u64,
    gpa_end: u64,
}

impl Engine {
    /// Turns on dirty logging for `vm` (manual protect) and allocates the
    /// harvest buffers and the staging; the page encoder's cache has the
    /// default size.
    pub fn new(vm: &mut Vm) -> Result<Self, FtError> {
        Self::with_cache(vm, DEFAULT_CACHE_BYTES)
    }

    /// [`Engine::new`] with a cache of `cache_bytes` of recently sent pages
    /// for delta encoding (0: no deltas; zero pages are still sent as a flag).
    pub fn with_cache(vm: &mut Vm, cache_bytes: u64) -> Result<Self, FtError> {
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
        let disks = DiskJournals::new(vm);
        disks.start(vm);
        let gpa_end = vm.memory.last_addr().0 + 1;
        Ok(Engine {
            log,
            harvests,
            staging,
            state_buf: Vec::with_capacity(64 * 1024),
            region_bases,
            disks,
            encoder: Encoder::new(cache_bytes, gpa_end),
            cache_bytes,
            gpa_end,
        })
    }

    /// Dirty logging back on for a new pairing (it was turned off when the
    /// last standby was lost).
    pub fn restart_tracking(&mut self, vm: &Vm) -> Result<(), FtError> {
        memory::register_slots(&vm.fd, &vm.memory, true).map_err(crate::vm::VmError::from)?;
        self.disks.start(vm);
        Ok(())
    }

    /// Dirty logging off (no standby): the guest stops paying for it. The
    /// dirty rings are emptied so that no vCPU waits on a full one.
    pub fn stop_tracking(&mut self, vm: &Vm) {
        self.disks.stop();
        // The cache's memory goes back; a new pairing starts from nothing.
        self.encoder = Encoder::new(self.cache_bytes, self.gpa_end);
        if let Err(e) = memory::register_slots(&vm.fd, &vm.memory, false) {
            log::warn!("cannot turn dirty logging off: {e}");
        }
        if self.log.uses_rings() {
            if let Err(err) = self.log.harvest(&vm.fd) {
                log::warn!("cannot drain the dirty rings: {err}");
            }
        }
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
    /// machine state and the dirty pages into the staging, seal `outputs`,
    /// resume (also when the capture fails). The checkpoint is then in
    /// [`Engine::staging`], ready to stream.
    pub fn capture(
        &mut self,
        vm: &mut Vm,
        outputs: Option<&dyn OutputCommit>,
        epoch: u64,
        hash: bool,
    ) -> Result<Capture, FtError> {
        let t_pause = Instant::now();
        let mut vm = Paused(vm);
        // Stop the guest; its vCPU threads go on saving their registers
        // while this thread harvests and copies the dirty pages.
        vm.begin_save(PAUSE_TIMEOUT)?;
        let t_harvest = Instant::now();
        let counts = self.harvest(&vm)?;
        let t_stage = Instant::now();
        let Engine {
            staging,
            harvests,
            region_bases,
            state_buf,
            ..
        } = self;
        let mut w = staging.begin_epoch();
        stage_pages(&vm, harvests, region_bases, &mut w)?;
        let t_save = Instant::now();
        let state = vm.finish_save(PAUSE_TIMEOUT)?;
        let t_encode = Instant::now();
        encode_state(&state, state_buf)?;
        w.stage_state(state_buf)?;
        let stats = w.finish();
        let held = outputs.map(|o| o.seal(epoch)).unwrap_or_default();
        let disk = self.disks.seal();
        if hash {
            log::info!(
                target: crate::REPORT,
                "memory crc at epoch {epoch}: {:08x}",
                super::memory_crc(&vm.memory)
            );
            if let Ok(disks) = super::disk::clone_disks(&vm) {
                if !disks.is_empty() {
                    log::info!(
                        target: crate::REPORT,
                        "disk crc at epoch {epoch}: {}",
                        super::disk::crc_line(&disks)
                    );
                }
            }
        }
        let t_done = Instant::now();
        let resumed = vm.resume();
        Ok(Capture {
            pause: resumed - t_pause,
            stop: t_harvest - t_pause,
            save: (t_harvest - t_pause) + (t_encode - t_save),
            encode: t_done - t_encode,
            harvest: t_stage - t_harvest,
            stage: t_save - t_stage,
            counts,
            stats,
            held,
            disk,
        })
    }

    /// Encodes the captured checkpoint's pages for the wire (zero pages as
    /// a flag, recently sent pages as deltas against what the standby holds),
    /// after the resume: the guest runs meanwhile.
    pub fn encode(&mut self) -> EncodeStats {
        self.encoder.encode(&mut self.staging)
    }

    /// The captured checkpoint as a frame: the staged pages (as encoded) and
    /// state, and the disks' records of the epoch.
    pub fn frame(&self, epoch: u64, generation: u64) -> CheckpointFrame<'_> {
        CheckpointFrame::with_disks(&self.staging, epoch, generation, self.disks.sealed())
    }

    /// The initial sync's pages, staged batch by batch while the guest runs,
    /// each batch handed to `send` (which returns the bytes it sent): first
    /// every page that is not zero — pages the host never backed are skipped
    /// unread, the others read and tested, since a new standby's memory
    /// starts zero — then rounds of the pages dirtied meanwhile, encoded
    /// like checkpoints, until few remain (the rest goes with epoch 1). The
    /// encoder's cache starts empty: a new standby holds nothing sent before.
    pub fn precopy(
        &mut self,
        vm: &Vm,
        mut send: impl FnMut(&Staging) -> Result<u64, FtError>,
    ) -> Result<PrecopyReport, FtError> {
        self.encoder.reset();
        let mut report = PrecopyReport {
            pages: memory::page_count(&vm.memory),
            ..Default::default()
        };
        // The first pass: all of memory. The dirty log is already on, so
        // anything the guest writes meanwhile is sent again by the rounds.
        let mut pagemap = Pagemap::open();
        let mut backed = vec![false; PAGEMAP_CHUNK];
        let mut batch: Vec<u64> = Vec::with_capacity(PRECOPY_BATCH);
        for (i, region) in vm.memory.iter().enumerate() {
            let base = self.region_bases[i];
            let pages = (region.len() / PAGE_SIZE as u64) as usize;
            let host = region.as_ptr() as usize;
            let anonymous = region.file_offset().is_none()
                && region.flags() & libc::MAP_ANONYMOUS != 0
                && region.flags() & libc::MAP_PRIVATE != 0;
            let mut start = 0;
            while start < pages {
                let n = PAGEMAP_CHUNK.min(pages - start);
                let chunk = &mut backed[..n];
                match pagemap.as_mut().filter(|_| anonymous) {
                    Some(pm) => {
                        if let Err(e) = pm.backed(host + start * PAGE_SIZE, chunk) {
                            log::warn!("cannot read the page map ({e}): reading every page");
                            pagemap = None;
                            chunk.fill(true);
                        }
                    }
                    None => chunk.fill(true),
                }
                for (k, &b) in chunk.iter().enumerate() {
                    if !b {
                        report.untouched += 1;
                        continue;
                    }
                    batch.push(base + ((start + k) * PAGE_SIZE) as u64);
                    if batch.len() == PRECOPY_BATCH {
                        self.send_batch(vm, &batch, true, &mut send, &mut report)?;
                        batch.clear();
                    }
                }
                start += n;
            }
        }
        self.send_batch(vm, &batch, true, &mut send, &mut report)?;
        report.bulk = report.pages - report.untouched - report.zero;
        for round in 1..=PRECOPY_MAX_ROUNDS {
            let counts = self.harvest(vm)?;
            let dirty: Vec<u64> = self.dirty_gpas().collect();
            for chunk in dirty.chunks(PRECOPY_BATCH) {
                self.send_batch(vm, chunk, false, &mut send, &mut report)?;
            }
            report.resent += counts.total();
            report.rounds = round as u32;
            log::info!("initial sync round {round}: {} dirty pages", counts.total());
            if (counts.total() as usize) < PRECOPY_DONE_PAGES {
                break;
            }
        }
        Ok(report)
    }

    /// Stages the pages at `gpas` (read while the guest runs) and sends them
    /// as one frame: in the first pass without the zero ones, in a later
    /// round encoded (a zero page there may have had content before).
    fn send_batch(
        &mut self,
        vm: &Vm,
        gpas: &[u64],
        first_pass: bool,
        send: &mut impl FnMut(&Staging) -> Result<u64, FtError>,
        report: &mut PrecopyReport,
    ) -> Result<(), FtError> {
        let mut w = self.staging.begin_epoch();
        for &gpa in gpas {
            let slot = w.page_slot(gpa)?;
            read_page(vm, gpa, slot)?;
            if first_pass && is_zero(slot) {
                w.unstage_last();
                report.zero += 1;
            }
        }
        w.finish();
        if !first_pass {
            self.encoder.encode(&mut self.staging);
        }
        if self.staging.page_count() > 0 {
            report.bytes += send(&self.staging)?;
        }
        Ok(())
    }

    /// The initial sync of `vm`'s disks (see [`super::disk::sync_disks`]):
    /// each batch of blocks goes to `send` as an epoch-0 frame of
    /// `generation` with no pages.
    pub fn sync_disks(
        &mut self,
        vm: &Vm,
        theirs: Option<&[Vec<[u8; super::disk::HASH_LEN]>]>,
        generation: u64,
        mut send: impl FnMut(&CheckpointFrame<'_>) -> Result<(), FtError>,
    ) -> Result<super::disk::SyncReport, FtError> {
        let disks = super::disk::clone_disks(vm)?;
        self.staging.begin_epoch().finish();
        let staging = &self.staging;
        super::disk::sync_disks(&disks, theirs, |disk, records| {
            let one = std::iter::once((disk, records));
            send(&CheckpointFrame::with_disks(staging, 0, generation, one))
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

/// Reads the page at `gpa` through vm-memory (the guest may be running).
fn read_page(vm: &Vm, gpa: u64, slot: &mut [u8]) -> Result<(), FtError> {
    vm.memory
        .read_slice(slot, GuestAddress(gpa))
        .map_err(|e| FtError::GuestMemory {
            gpa,
            reason: e.to_string(),
        })
}

/// Copies the harvested pages into the epoch being staged, vCPUs and
/// devices paused: nothing writes guest memory, so each page is one plain
/// memcpy (vm-memory's volatile copy is ≈1.5× slower, measured by the `ft`
/// benchmark).
fn stage_pages(
    vm: &Vm,
    harvests: &[HarvestBuffer],
    region_bases: &[u64],
    w: &mut EpochWriter<'_>,
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
            // SAFETY: `page` is a page of the region that starts at `base` (the
            // harvest buffer is sized to it), so the 4 KiB at host + page × 4096
            // are mapped for the region's lifetime; nothing writes them
            // concurrently because every vCPU is out of KVM_RUN and every device
            // is paused; the slot is a distinct staging buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    host.add(page * PAGE_SIZE),
                    slot.as_mut_ptr(),
                    PAGE_SIZE,
                )
            }
        }
    }
    Ok(())
}
