//! The primary's checkpoint machinery: dirty log, harvest buffers and slab
//! staging; the epoch capture (steps 1–5 of docs/design.md "The epoch") and
//! the staging of the initial sync.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::{
    encode_state, CheckpointFrame, DirtyCounts, EpochWriter, HarvestBuffer, Staging, StagingConfig,
    PAGE_SIZE,
};
use ftvmm_devices::virtio::block::JournalCounts;
use ftvmm_netbuf::{Held, OutputCommit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::disk::DiskJournals;
use super::FtError;
use crate::dirty_log::DirtyLog;
use crate::memory;
use crate::vm::Vm;

/// How long vCPUs get to acknowledge a pause.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pages per frame of the initial sync.
const PRECOPY_BATCH: usize = 16 * 1024;
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

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// What one checkpoint capture cost and produced.
#[derive(Debug, Clone, Copy)]
pub struct Capture {
    /// The guest was paused this long (pause → resume).
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

/// The epoch machinery of the primary: dirty log, harvest buffers, staging.
pub struct Engine {
    pub(crate) log: DirtyLog,
    harvests: Vec<HarvestBuffer>,
    staging: Staging,
    state_buf: Vec<u8>,
    region_bases: Vec<u64>,
    disks: DiskJournals,
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
        let disks = DiskJournals::new(vm);
        disks.start(vm);
        Ok(Engine {
            log,
            harvests,
            staging,
            state_buf: Vec::with_capacity(64 * 1024),
            region_bases,
            disks,
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
        stage_pages(&vm, harvests, region_bases, &mut w, PageCopy::Paused)?;
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
        drop(vm);
        Ok(Capture {
            pause: t_pause.elapsed(),
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

    /// The captured checkpoint as a frame: the staged pages and state, and
    /// the disks' records of the epoch.
    pub fn frame(&self, epoch: u64, generation: u64) -> CheckpointFrame<'_> {
        CheckpointFrame::with_disks(&self.staging, epoch, generation, self.disks.sealed())
    }

    /// The initial sync's pages, staged batch by batch while the guest runs,
    /// each batch handed to `send`: all of memory, then rounds of the pages
    /// dirtied meanwhile until few remain (the rest goes with epoch 1).
    /// Returns the pages staged.
    pub fn precopy(
        &mut self,
        vm: &Vm,
        mut send: impl FnMut(&Staging) -> Result<(), FtError>,
    ) -> Result<u64, FtError> {
        let mut sent_pages = 0u64;
        // Round 0: all of memory. The dirty log is already on, so anything
        // the guest writes while we copy is sent again in the next rounds.
        for (region, base) in vm.memory.iter().zip(self.region_bases.clone()) {
            let pages = (region.len() / PAGE_SIZE as u64) as usize;
            let mut start = 0;
            while start < pages {
                let end = (start + PRECOPY_BATCH).min(pages);
                let mut w = self.staging.begin_epoch();
                for page in start..end {
                    let gpa = base + (page * PAGE_SIZE) as u64;
                    read_page(vm, gpa, w.page_slot(gpa)?)?;
                }
                w.finish();
                send(&self.staging)?;
                sent_pages += (end - start) as u64;
                start = end;
            }
        }
        for round in 1..=PRECOPY_MAX_ROUNDS {
            let counts = self.harvest(vm)?;
            let mut w = self.staging.begin_epoch();
            stage_pages(
                vm,
                &self.harvests,
                &self.region_bases,
                &mut w,
                PageCopy::Live,
            )?;
            w.finish();
            send(&self.staging)?;
            sent_pages += counts.total();
            log::info!("initial sync round {round}: {} dirty pages", counts.total());
            if (counts.total() as usize) < PRECOPY_DONE_PAGES {
                break;
            }
        }
        Ok(sent_pages)
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

/// Reads the page at `gpa` through vm-memory (the guest may be running).
fn read_page(vm: &Vm, gpa: u64, slot: &mut [u8]) -> Result<(), FtError> {
    vm.memory
        .read_slice(slot, GuestAddress(gpa))
        .map_err(|e| FtError::GuestMemory {
            gpa,
            reason: e.to_string(),
        })
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
                PageCopy::Live => read_page(vm, gpa, &mut slot[..])?,
            }
        }
    }
    Ok(())
}
