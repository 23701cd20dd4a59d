//! Slab staging of a checkpoint (DESIGN.md "Staging memory", after the MC spec).
//!
//! A checkpoint's payload is a byte stream laid over a list of fixed-size slabs: first the
//! dirty pages, back to back, 4 KiB each, then the encoded state bytes (which may straddle
//! slabs). A page-index table records the guest physical address of each staged page, in
//! order, as little-endian `u64`s — exactly the bytes the wire format sends (the low 12
//! bits of an entry carry the page's [`PageKind`], raw until it is encoded).
//!
//! After the pause, [`crate::encoding::Encoder`] may encode the staged pages: zero pages
//! and deltas leave their slots unsent (the frame sends the raw pages' slots in runs) and
//! the deltas go to a delta section. A receiver lays only the raw pages it received into
//! its slots, back to back, and keeps the delta section; [`Staging::entries`] gives every
//! page of either layout as [`PageData`].
//!
//! - The head slab is permanent, and the index table is reserved for the guest's whole
//!   page count up front, so an idle epoch (no dirty page, a small state) allocates
//!   nothing.
//! - The slab list grows when a checkpoint needs more.
//! - Each finished checkpoint that would have fit in fewer slabs than the cache holds is a
//!   *strike*; a checkpoint that needs the whole cache clears the strikes. After
//!   [`StagingConfig::strike_limit`] consecutive strikes the cache is halved (never below
//!   the head slab). Slabs still holding the finished checkpoint are never freed under
//!   it: the halving is applied by [`Staging::trim`] (call it after the checkpoint has been
//!   sent, outside the pause) or at the latest by the next [`Staging::begin_epoch`].
//!
//! Slabs are the unit of transmission ([`Staging::slab_chunks`] gives the used part of each
//! one, for vectored writes) and, for RDMA, of memory registration: [`Staging::slab_set`]
//! tells a transport when the slabs changed ([`SlabSet`]), [`Staging::slab_buffers`] what
//! they are now.
//!
//! Writing a checkpoint goes through an [`EpochWriter`], which borrows the staging
//! mutably: nobody can read a half-staged checkpoint, and an epoch abandoned by dropping
//! the writer leaves the staging empty.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::DEFAULT_STATE_LIMIT;
use crate::encoding::{DeltaRecords, PageData, PageKind, KIND_MASK};

/// The guest page size that dirty tracking and staging work in.
pub const PAGE_SIZE: usize = 4096;

/// One guest page.
pub type Page = [u8; PAGE_SIZE];

/// Default slab size: 1 MiB (256 pages). Large enough that a vectored write of a busy
/// checkpoint is a handful of slices (TCP loopback reaches its best throughput with
/// writes of about 1 MiB on the project's machines), small enough that an idle guest's
/// permanent head slab costs little.
pub const DEFAULT_SLAB_BYTES: usize = 1 << 20;

/// Default number of consecutive under-used checkpoints before the slab cache is halved.
pub const DEFAULT_STRIKE_LIMIT: u32 = 10;

/// How a [`Staging`] is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Size of one slab in bytes: a non-zero multiple of [`PAGE_SIZE`].
    pub slab_bytes: usize,
    /// Consecutive strikes after which the slab cache is halved (at least 1).
    pub strike_limit: u32,
    /// Most pages one checkpoint may hold (the guest's page count). The index table is
    /// reserved for this many entries up front (8 bytes each, address space only until
    /// touched).
    pub max_pages: usize,
    /// Most state bytes one checkpoint may hold.
    pub max_state_bytes: usize,
}

impl StagingConfig {
    /// The default configuration for a guest of `mem_bytes` bytes of memory.
    pub fn for_guest(mem_bytes: u64) -> Self {
        StagingConfig {
            slab_bytes: DEFAULT_SLAB_BYTES,
            strike_limit: DEFAULT_STRIKE_LIMIT,
            max_pages: usize::try_from(mem_bytes.div_ceil(PAGE_SIZE as u64)).unwrap_or(usize::MAX),
            max_state_bytes: DEFAULT_STATE_LIMIT as usize,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), StagingError> {
        if self.slab_bytes == 0 || self.slab_bytes % PAGE_SIZE != 0 {
            return Err(StagingError::BadSlabSize(self.slab_bytes));
        }
        if self.strike_limit == 0 {
            return Err(StagingError::ZeroStrikeLimit);
        }
        // The whole payload must be addressable.
        self.max_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|b| b.checked_add(self.max_state_bytes))
            .ok_or(StagingError::TooBig {
                max_pages: self.max_pages,
                max_state_bytes: self.max_state_bytes,
            })?;
        Ok(())
    }
}

/// Errors of slab staging.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StagingError {
    /// The configured slab size is unusable.
    #[error("slab size of {0} bytes is not a non-zero multiple of the {PAGE_SIZE}-byte page size")]
    BadSlabSize(usize),
    /// The configured strike limit is zero.
    #[error("the slab strike limit must be at least 1")]
    ZeroStrikeLimit,
    /// The configured maxima overflow the address space.
    #[error("staging for {max_pages} pages and {max_state_bytes} state bytes overflows the address space")]
    TooBig {
        /// Configured page maximum.
        max_pages: usize,
        /// Configured state maximum.
        max_state_bytes: usize,
    },
    /// A page address is not page aligned.
    #[error("guest physical address {gpa:#x} is not aligned to {PAGE_SIZE} bytes")]
    Unaligned {
        /// The address given.
        gpa: u64,
    },
    /// The checkpoint already holds the most pages it may.
    #[error(
        "checkpoint already holds {max} pages, the guest's size; cannot stage the page at {gpa:#x}"
    )]
    TooManyPages {
        /// The maximum.
        max: usize,
        /// The page refused.
        gpa: u64,
    },
    /// A page was staged after state bytes.
    #[error("the page at {gpa:#x} comes after state bytes; stage every page before the state")]
    PageAfterState {
        /// The page refused.
        gpa: u64,
    },
    /// The state bytes exceed the configured maximum.
    #[error("checkpoint state of {len} bytes exceeds the limit of {max} bytes")]
    StateTooLarge {
        /// State bytes the checkpoint would hold.
        len: usize,
        /// The maximum.
        max: usize,
    },
}

/// What one staged checkpoint took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochStats {
    /// Pages staged.
    pub pages: usize,
    /// State bytes staged.
    pub state_bytes: usize,
    /// Payload bytes (pages × 4096 + state).
    pub payload_bytes: usize,
    /// Slabs the payload occupies (at least 1: the head slab).
    pub slabs_used: usize,
    /// Slabs in the cache after this checkpoint.
    pub slabs_cached: usize,
    /// Slabs allocated while staging this checkpoint.
    pub slabs_grown: usize,
    /// Consecutive strikes after this checkpoint.
    pub strikes: u32,
    /// Set when this checkpoint was the strike that decided to halve the cache: the number
    /// of slabs [`Staging::trim`] will shrink it to.
    pub shrink_to: Option<usize>,
}

/// Which slabs a [`Staging`] holds, for a transport that registers them with a device
/// (RDMA) and must know when its registrations went stale.
///
/// Two values from the same staging are equal while its slab list is unchanged. A staging
/// that only *added* slabs keeps its lineage (every registration made so far is still
/// good; the new slabs need one); one that *freed* slabs gets a new lineage, never used by
/// any staging before in this process, so every registration made under the old one must
/// be dropped (a new slab may be allocated where a freed one was, and a registration pins
/// the old memory, not the new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlabSet {
    lineage: u64,
    count: usize,
}

impl SlabSet {
    /// Whether `self` only added slabs to `earlier` (or is the same set): registrations
    /// made for `earlier`'s slabs are still valid.
    pub fn extends(&self, earlier: &SlabSet) -> bool {
        self.lineage == earlier.lineage && self.count >= earlier.count
    }

    /// Slabs in the set.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// Lineages handed out so far in this process (see [`SlabSet`]).
static LINEAGES: AtomicU64 = AtomicU64::new(0);

fn new_lineage() -> u64 {
    LINEAGES.fetch_add(1, Ordering::Relaxed)
}

/// The staging area of one side (primary or standby) of a protected VM.
#[derive(Debug)]
pub struct Staging {
    cfg: StagingConfig,
    pages_per_slab: usize,
    slabs: Vec<Box<[Page]>>,
    /// Little-endian index entry of each staged page: gpa | kind.
    index: Vec<[u8; 8]>,
    /// Payload bytes in the slabs: page slots × 4096 + state.
    used: usize,
    state_len: usize,
    /// Pages of kind raw (their 4096 bytes are sent).
    raw: usize,
    /// Receiver layout: the raw pages back to back in the slots. Otherwise (sender) page
    /// i is in slot i, whatever its kind.
    packed: bool,
    /// The kinds were set by an encoder.
    encoded: bool,
    /// The delta section (sent or received).
    delta: Vec<u8>,
    strikes: u32,
    shrink_to: Option<usize>,
    grown: usize,
    /// Changes whenever slabs are freed (see [`SlabSet`]).
    lineage: u64,
    /// A received checkpoint's disk section (the sender's is in its disks'
    /// journals).
    disk: Vec<u8>,
}

fn new_slab(pages: usize) -> Box<[Page]> {
    // A zeroed array of pages: `vec!` takes the calloc path, so the memory is only
    // committed when first written.
    vec![[0u8; PAGE_SIZE]; pages].into_boxed_slice()
}

impl Staging {
    /// Creates a staging area with its permanent head slab and its index table reserved.
    pub fn new(cfg: StagingConfig) -> Result<Self, StagingError> {
        cfg.validate()?;
        let pages_per_slab = cfg.slab_bytes / PAGE_SIZE;
        let max_slabs = (cfg.max_pages * PAGE_SIZE + cfg.max_state_bytes).div_ceil(cfg.slab_bytes);
        let mut slabs = Vec::with_capacity(max_slabs.clamp(1, 1 << 16));
        slabs.push(new_slab(pages_per_slab));
        Ok(Staging {
            cfg,
            pages_per_slab,
            slabs,
            index: Vec::with_capacity(cfg.max_pages),
            used: 0,
            state_len: 0,
            raw: 0,
            packed: false,
            encoded: false,
            delta: Vec::new(),
            strikes: 0,
            shrink_to: None,
            grown: 0,
            lineage: new_lineage(),
            disk: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StagingConfig {
        &self.cfg
    }

    /// Starts staging a new checkpoint. The previous one is discarded (it must have been
    /// sent), and a pending halving of the cache is applied.
    pub fn begin_epoch(&mut self) -> EpochWriter<'_> {
        self.reset();
        self.trim();
        EpochWriter {
            staging: self,
            finished: false,
        }
    }

    /// Applies a pending halving of the slab cache as far as the checkpoint still held
    /// allows; returns the number of slabs freed. Call it after the checkpoint has been
    /// sent, outside the pause: freeing memory may take system calls.
    pub fn trim(&mut self) -> usize {
        let Some(target) = self.shrink_to else {
            return 0;
        };
        let keep = target.max(self.slabs_used()).max(1);
        let before = self.slabs.len();
        if keep < before {
            self.slabs.truncate(keep);
            self.lineage = new_lineage();
        }
        if keep == target {
            self.shrink_to = None;
        }
        before - self.slabs.len()
    }

    /// Slabs currently cached (the head slab included).
    pub fn slab_count(&self) -> usize {
        self.slabs.len()
    }

    /// Which slabs the cache holds now (see [`SlabSet`]).
    pub fn slab_set(&self) -> SlabSet {
        SlabSet {
            lineage: self.lineage,
            count: self.slabs.len(),
        }
    }

    /// Every cached slab's whole memory, in order, used or not: what a transport
    /// registers with its device. Slab memory stays where it is until the slab is freed
    /// (a [`SlabSet`] of a new lineage).
    pub fn slab_buffers(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.slabs.iter().map(|s| s.as_flattened())
    }

    /// Slabs the staged checkpoint occupies (at least 1).
    pub fn slabs_used(&self) -> usize {
        self.used.div_ceil(self.cfg.slab_bytes).max(1)
    }

    /// Consecutive strikes so far.
    pub fn strikes(&self) -> u32 {
        self.strikes
    }

    /// Pages in the staged checkpoint.
    pub fn page_count(&self) -> usize {
        self.index.len()
    }

    /// State bytes in the staged checkpoint.
    pub fn state_len(&self) -> usize {
        self.state_len
    }

    /// Payload bytes in the slabs (page slots × 4096 + state).
    pub fn payload_len(&self) -> usize {
        self.used
    }

    /// Pages of kind raw: all of them until an encoder ran.
    pub fn raw_count(&self) -> usize {
        self.raw
    }

    /// The delta section (empty until an encoder made deltas).
    pub fn delta_bytes(&self) -> &[u8] {
        &self.delta
    }

    /// Bytes the frame carries after its page index, disks aside: the raw pages, the
    /// state and the delta section.
    pub fn wire_payload_len(&self) -> usize {
        self.raw * PAGE_SIZE + self.state_len + self.delta.len()
    }

    /// The page index as sent on the wire: one little-endian `u64` per staged page, its
    /// gpa with the page's kind in the low 12 bits.
    pub fn index_bytes(&self) -> &[u8] {
        self.index.as_flattened()
    }

    /// The guest physical addresses of the staged pages, in staging order.
    pub fn gpas(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.index
            .iter()
            .map(|b| u64::from_le_bytes(*b) & !KIND_MASK)
    }

    /// The raw pages with their addresses, in staging order: every staged page until an
    /// encoder ran.
    pub fn pages(&self) -> RawPages<'_> {
        RawPages {
            staging: self,
            entry: 0,
            slot: 0,
            left: self.raw,
        }
    }

    /// Every staged page with its address and how it is sent, in staging order.
    pub fn entries(&self) -> Entries<'_> {
        Entries {
            staging: self,
            entry: 0,
            slot: 0,
            deltas: DeltaRecords::new(&self.delta),
        }
    }

    fn slot(&self, n: usize) -> &Page {
        &self.slabs[n / self.pages_per_slab][n % self.pages_per_slab]
    }

    /// The used part of each slab, in order (the slots of every staged page, then the
    /// state), for incremental checksumming and tests.
    pub fn slab_chunks(&self) -> Chunks<'_> {
        self.chunks(0, self.used)
    }

    /// The frame's payload after its page index, as chunks straight into the slabs, for
    /// vectored writes: the raw pages (runs of consecutive raw slots), the state, the
    /// delta section.
    pub fn payload_chunks(&self) -> PayloadChunks<'_> {
        let contiguous = self.packed || self.raw == self.index.len();
        let (runs_end, state) = if contiguous {
            // Raw pages and state are one stretch of the slabs.
            (self.index.len(), self.chunks(0, self.used))
        } else {
            (0, self.state_chunks())
        };
        PayloadChunks {
            runs: RawRuns {
                index: &self.index,
                slabs: &self.slabs,
                per_slab: self.pages_per_slab,
                at: runs_end,
            },
            state,
            delta: (!self.delta.is_empty()).then_some(&self.delta[..]),
        }
    }

    /// The state bytes, as one or more chunks (they may straddle slabs).
    pub fn state_chunks(&self) -> Chunks<'_> {
        self.chunks(self.used - self.state_len, self.state_len)
    }

    /// The state bytes if they lie in one slab.
    pub fn state_contiguous(&self) -> Option<&[u8]> {
        let mut it = self.state_chunks();
        match (it.next(), it.next()) {
            (None, _) => Some(&[]),
            (Some(c), None) => Some(c),
            _ => None,
        }
    }

    /// Copies the state bytes into `out` (replacing its contents, reusing its capacity).
    pub fn copy_state_into(&self, out: &mut Vec<u8>) {
        out.clear();
        for c in self.state_chunks() {
            out.extend_from_slice(c);
        }
    }

    fn chunks(&self, start: usize, len: usize) -> Chunks<'_> {
        Chunks {
            slabs: &self.slabs,
            slab_bytes: self.cfg.slab_bytes,
            pos: start,
            end: start + len,
        }
    }

    /// Calls `f` on consecutive mutable chunks covering `[start, start + len)` of the
    /// payload, growing the cache a slab at a time as the range reaches it (so a receiver
    /// allocates only as data actually arrives, never on a header's word alone).
    fn for_each_chunk_mut<E>(
        &mut self,
        start: usize,
        len: usize,
        mut f: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let sb = self.cfg.slab_bytes;
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let (s, off) = (pos / sb, pos % sb);
            if s >= self.slabs.len() {
                self.grow_to(s + 1);
            }
            let n = (sb - off).min(end - pos);
            f(&mut self.slabs[s].as_flattened_mut()[off..off + n])?;
            pos += n;
        }
        Ok(())
    }

    /// Makes sure the cache holds at least `n` slabs.
    #[cold]
    #[inline(never)]
    fn grow_to(&mut self, n: usize) {
        while self.slabs.len() < n {
            self.slabs.push(new_slab(self.pages_per_slab));
            self.grown += 1;
        }
    }

    /// Empties the staged checkpoint (the cache is kept).
    fn reset(&mut self) {
        self.disk.clear();
        self.delta.clear();
        self.index.clear();
        self.used = 0;
        self.state_len = 0;
        self.raw = 0;
        self.packed = false;
        self.encoded = false;
        self.grown = 0;
    }

    /// Sets each staged page's kind with `f(gpa, page, delta section)`, which appends a
    /// delta record for a page it makes a delta. Only a finished, not yet encoded
    /// checkpoint of a sender is encoded; otherwise nothing happens.
    pub(crate) fn encode_with(&mut self, mut f: impl FnMut(u64, &Page, &mut Vec<u8>) -> PageKind) {
        if self.encoded || self.packed {
            return;
        }
        let Staging {
            slabs,
            index,
            delta,
            pages_per_slab,
            ..
        } = self;
        delta.clear();
        // Room for a delta of every page the slabs can hold, made when the
        // slabs grow (themselves an allocation) rather than when an epoch
        // happens to make more delta bytes than any before: the encode then
        // allocates nothing. Untouched capacity is never backed.
        let room = slabs.len() * *pages_per_slab * crate::encoding::MAX_DELTA_RECORD;
        if delta.capacity() < room {
            delta.reserve_exact(room);
        }
        let mut raw = 0;
        for (i, entry) in index.iter_mut().enumerate() {
            let gpa = u64::from_le_bytes(*entry) & !KIND_MASK;
            let kind = f(gpa, &slabs[i / *pages_per_slab][i % *pages_per_slab], delta);
            *entry = (gpa | kind as u64).to_le_bytes();
            raw += usize::from(kind == PageKind::Raw);
        }
        self.raw = raw;
        self.encoded = true;
    }

    /// Strike accounting for a finished checkpoint.
    fn account(&mut self) -> EpochStats {
        let slabs_used = self.slabs_used();
        let cached = self.slabs.len();
        let mut shrink_to = None;
        if slabs_used < cached {
            self.strikes += 1;
            if self.strikes >= self.cfg.strike_limit {
                let target = (cached / 2).max(1);
                self.shrink_to = Some(target);
                shrink_to = Some(target);
                self.strikes = 0;
            }
        } else {
            self.strikes = 0;
            self.shrink_to = None;
        }
        EpochStats {
            pages: self.index.len(),
            state_bytes: self.state_len,
            payload_bytes: self.used,
            slabs_used,
            slabs_cached: cached,
            slabs_grown: self.grown,
            strikes: self.strikes,
            shrink_to,
        }
    }

    // ---- receiver side (used by `wire::FrameReader`) ----

    /// Prepares to receive a checkpoint of `pages` pages (already validated against the
    /// limits); returns the index table to fill.
    pub(crate) fn recv_begin(&mut self, pages: usize) -> &mut [u8] {
        self.reset();
        self.trim();
        self.packed = true;
        self.index.resize(pages, [0; 8]);
        self.index.as_flattened_mut()
    }

    /// Fills the payload announced to [`Self::recv_begin`] — `raw` raw pages back to back,
    /// then `state_len` state bytes — chunk by chunk, with `f` (slabs are added only as
    /// the data reaches them).
    pub(crate) fn recv_payload<E>(
        &mut self,
        raw: usize,
        state_len: usize,
        f: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let total = raw * PAGE_SIZE + state_len;
        self.raw = raw;
        self.used = total;
        self.state_len = state_len;
        self.for_each_chunk_mut(0, total, f)
    }

    /// Fills a received checkpoint's delta section of `len` bytes with `f`, a piece at a
    /// time (the buffer grows as data arrives, never on a header's word alone).
    pub(crate) fn recv_delta<E>(
        &mut self,
        len: usize,
        mut f: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        const PIECE: usize = 64 << 10;
        self.delta.clear();
        while self.delta.len() < len {
            let start = self.delta.len();
            self.delta.resize(start + (len - start).min(PIECE), 0);
            f(&mut self.delta[start..])?;
        }
        Ok(())
    }

    /// The buffer for a received checkpoint's disk section of `len` bytes.
    pub(crate) fn recv_disk(&mut self, len: usize) -> &mut [u8] {
        self.disk.clear();
        self.disk.resize(len, 0);
        &mut self.disk
    }

    /// A received checkpoint's disk section.
    pub(crate) fn disk_bytes(&self) -> &[u8] {
        &self.disk
    }

    /// Completes a received checkpoint (strike accounting included).
    pub(crate) fn recv_finish(&mut self) -> EpochStats {
        self.account()
    }

    /// Drops a torn or corrupt received checkpoint.
    pub(crate) fn recv_abort(&mut self) {
        self.reset();
    }

    /// Page index entry `i` (gpa | kind).
    pub(crate) fn entry_at(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.index[i])
    }
}

/// The raw pages of a staging with their addresses (see [`Staging::pages`]).
#[derive(Debug, Clone)]
pub struct RawPages<'a> {
    staging: &'a Staging,
    entry: usize,
    slot: usize,
    left: usize,
}

impl<'a> Iterator for RawPages<'a> {
    type Item = (u64, &'a Page);

    fn next(&mut self) -> Option<(u64, &'a Page)> {
        let st = self.staging;
        while self.entry < st.index.len() {
            let (i, e) = (self.entry, st.entry_at(self.entry));
            self.entry += 1;
            let slot = if st.packed { self.slot } else { i };
            if e & KIND_MASK == PageKind::Raw as u64 {
                self.slot += 1;
                self.left = self.left.saturating_sub(1);
                return Some((e & !KIND_MASK, st.slot(slot)));
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for RawPages<'_> {}

/// Every page of a staging with its address and data (see [`Staging::entries`]). A
/// received staging's delta section was checked when it arrived; should a record still
/// not parse, its page is yielded as an empty delta against CRC 0, which no page matches
/// (the standby's apply checks every base before writing).
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    staging: &'a Staging,
    entry: usize,
    slot: usize,
    deltas: DeltaRecords<'a>,
}

impl<'a> Iterator for Entries<'a> {
    type Item = (u64, PageData<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let st = self.staging;
        if self.entry >= st.index.len() {
            return None;
        }
        let (i, e) = (self.entry, st.entry_at(self.entry));
        self.entry += 1;
        let gpa = e & !KIND_MASK;
        let data = match PageKind::of_entry(e) {
            Some(PageKind::Raw) => {
                let slot = if st.packed { self.slot } else { i };
                self.slot += 1;
                PageData::Raw(st.slot(slot))
            }
            Some(PageKind::Zero) => PageData::Zero,
            Some(PageKind::Delta) | None => match self.deltas.next_record() {
                Ok((base_crc, runs)) => PageData::Delta { base_crc, runs },
                Err(_) => PageData::Delta {
                    base_crc: 0,
                    runs: &[],
                },
            },
        };
        Some((gpa, data))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.staging.index.len() - self.entry;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Entries<'_> {}

/// Runs of consecutive raw slots within one slab, each as one chunk (a sender's encoded
/// staging, where zero and delta pages leave their slots unsent).
#[derive(Debug, Clone)]
struct RawRuns<'a> {
    index: &'a [[u8; 8]],
    slabs: &'a [Box<[Page]>],
    per_slab: usize,
    at: usize,
}

impl<'a> Iterator for RawRuns<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let raw = |e: &[u8; 8]| u64::from_le_bytes(*e) & KIND_MASK == PageKind::Raw as u64;
        while self.at < self.index.len() && !raw(&self.index[self.at]) {
            self.at += 1;
        }
        if self.at >= self.index.len() {
            return None;
        }
        let start = self.at;
        let slab = start / self.per_slab;
        while self.at < self.index.len()
            && self.at / self.per_slab == slab
            && raw(&self.index[self.at])
        {
            self.at += 1;
        }
        let first = start % self.per_slab;
        let pages = &self.slabs[slab][first..first + (self.at - start)];
        Some(pages.as_flattened())
    }
}

/// The chunks of a frame's payload after its index (see [`Staging::payload_chunks`]).
#[derive(Debug, Clone)]
pub struct PayloadChunks<'a> {
    runs: RawRuns<'a>,
    state: Chunks<'a>,
    delta: Option<&'a [u8]>,
}

impl<'a> Iterator for PayloadChunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        self.runs
            .next()
            .or_else(|| self.state.next())
            .or_else(|| self.delta.take())
    }
}

/// Iterator over consecutive byte chunks of the payload, at most one per slab.
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    slabs: &'a [Box<[Page]>],
    slab_bytes: usize,
    pos: usize,
    end: usize,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.pos >= self.end {
            return None;
        }
        let (s, off) = (self.pos / self.slab_bytes, self.pos % self.slab_bytes);
        let n = (self.slab_bytes - off).min(self.end - self.pos);
        self.pos += n;
        Some(&self.slabs[s].as_flattened()[off..off + n])
    }
}

/// Stages one checkpoint into a [`Staging`]. Dropping it without [`EpochWriter::finish`]
/// abandons the epoch and leaves the staging empty.
#[derive(Debug)]
pub struct EpochWriter<'a> {
    staging: &'a mut Staging,
    finished: bool,
}

impl EpochWriter<'_> {
    /// Reserves the next page slot for the page at `gpa` and returns it, for the caller to
    /// fill straight from guest memory (no intermediate buffer). The slot holds stale bytes
    /// until written. Never allocates unless the slab cache must grow; never logs nor makes
    /// system calls.
    #[inline]
    pub fn page_slot(&mut self, gpa: u64) -> Result<&mut Page, StagingError> {
        let s = &mut *self.staging;
        if gpa % PAGE_SIZE as u64 != 0 {
            return Err(StagingError::Unaligned { gpa });
        }
        if s.state_len != 0 {
            return Err(StagingError::PageAfterState { gpa });
        }
        let n = s.index.len();
        if n >= s.cfg.max_pages {
            return Err(StagingError::TooManyPages {
                max: s.cfg.max_pages,
                gpa,
            });
        }
        let (slab, page) = (n / s.pages_per_slab, n % s.pages_per_slab);
        if slab >= s.slabs.len() {
            s.grow_to(slab + 1);
        }
        // Within the capacity reserved in `Staging::new`: no reallocation.
        s.index.push(gpa.to_le_bytes());
        s.used += PAGE_SIZE;
        s.raw += 1;
        Ok(&mut s.slabs[slab][page])
    }

    /// Takes back the page staged last (a page the caller found it need not send). Does
    /// nothing once state bytes were staged.
    pub fn unstage_last(&mut self) {
        let s = &mut *self.staging;
        if s.state_len == 0 && s.index.pop().is_some() {
            s.used -= PAGE_SIZE;
            s.raw -= 1;
        }
    }

    /// Copies the page at `gpa` from `src` into the next page slot.
    #[inline]
    pub fn stage_page(&mut self, gpa: u64, src: &Page) -> Result<(), StagingError> {
        self.page_slot(gpa)?.copy_from_slice(src);
        Ok(())
    }

    /// Appends state bytes after the pages (it may be called several times; no page may be
    /// staged after it).
    pub fn stage_state(&mut self, bytes: &[u8]) -> Result<(), StagingError> {
        let s = &mut *self.staging;
        let len = s.state_len + bytes.len();
        if len > s.cfg.max_state_bytes {
            return Err(StagingError::StateTooLarge {
                len,
                max: s.cfg.max_state_bytes,
            });
        }
        let start = s.used;
        let mut rest = bytes;
        s.for_each_chunk_mut(start, bytes.len(), |dst| {
            let (head, tail) = rest.split_at(dst.len());
            dst.copy_from_slice(head);
            rest = tail;
            Ok::<(), ()>(())
        })
        .ok();
        s.used += bytes.len();
        s.state_len = len;
        Ok(())
    }

    /// Pages staged so far.
    pub fn page_count(&self) -> usize {
        self.staging.index.len()
    }

    /// State bytes staged so far.
    pub fn state_len(&self) -> usize {
        self.staging.state_len
    }

    /// Completes the checkpoint: it becomes readable through the [`Staging`] accessors,
    /// and the strike accounting runs.
    pub fn finish(mut self) -> EpochStats {
        self.finished = true;
        self.staging.account()
    }
}

impl Drop for EpochWriter<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.staging.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(slab_pages: usize, strike_limit: u32) -> StagingConfig {
        StagingConfig {
            slab_bytes: slab_pages * PAGE_SIZE,
            strike_limit,
            max_pages: 1024,
            max_state_bytes: 64 * 1024,
        }
    }

    fn page(tag: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        for (i, c) in p.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&(tag * 1_000_003 + i as u64).to_le_bytes());
        }
        p
    }

    fn stage(st: &mut Staging, pages: usize, state: &[u8]) -> EpochStats {
        let mut w = st.begin_epoch();
        for i in 0..pages {
            w.stage_page(i as u64 * 4096, &page(i as u64)).unwrap();
        }
        w.stage_state(state).unwrap();
        w.finish()
    }

    #[test]
    fn config_validation() {
        assert_eq!(
            Staging::new(StagingConfig {
                slab_bytes: 4000,
                ..cfg(1, 1)
            })
            .unwrap_err(),
            StagingError::BadSlabSize(4000)
        );
        assert_eq!(
            Staging::new(StagingConfig {
                slab_bytes: 0,
                ..cfg(1, 1)
            })
            .unwrap_err(),
            StagingError::BadSlabSize(0)
        );
        assert_eq!(
            Staging::new(cfg(1, 0)).unwrap_err(),
            StagingError::ZeroStrikeLimit
        );
        let c = StagingConfig::for_guest(1 << 30);
        assert_eq!(c.max_pages, 262_144);
        assert_eq!(c.slab_bytes % PAGE_SIZE, 0);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn pages_and_state_roundtrip_across_slabs() {
        // 2-page slabs: 5 pages and a 10000-byte state straddle several slabs.
        let mut st = Staging::new(cfg(2, 10)).unwrap();
        let state: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let stats = stage(&mut st, 5, &state);
        assert_eq!(stats.pages, 5);
        assert_eq!(stats.state_bytes, 10_000);
        assert_eq!(stats.payload_bytes, 5 * 4096 + 10_000);
        assert_eq!(stats.slabs_used, (5 * 4096 + 10_000usize).div_ceil(8192));
        assert_eq!(stats.slabs_grown, stats.slabs_used - 1);
        for (i, (gpa, p)) in st.pages().enumerate() {
            assert_eq!(gpa, i as u64 * 4096);
            assert_eq!(p, &page(i as u64));
        }
        let mut s = Vec::new();
        st.copy_state_into(&mut s);
        assert_eq!(s, state);
        assert!(st.state_contiguous().is_none());
        // The chunks are the payload exactly, one per used slab.
        let chunks: Vec<&[u8]> = st.slab_chunks().collect();
        assert_eq!(chunks.len(), stats.slabs_used);
        assert_eq!(
            chunks.iter().map(|c| c.len()).sum::<usize>(),
            stats.payload_bytes
        );
        let flat: Vec<u8> = chunks.concat();
        assert_eq!(&flat[4096..8192], &page(1)[..]);
        assert_eq!(&flat[5 * 4096..], &state[..]);
        // The index bytes are the little-endian gpas.
        assert_eq!(st.index_bytes().len(), 5 * 8);
        assert_eq!(&st.index_bytes()[8..16], &4096u64.to_le_bytes());
    }

    #[test]
    fn page_slot_fills_in_place() {
        let mut st = Staging::new(cfg(4, 10)).unwrap();
        let mut w = st.begin_epoch();
        w.page_slot(0x5000).unwrap().fill(0xab);
        assert_eq!(w.page_count(), 1);
        w.finish();
        let (gpa, p) = st.pages().next().unwrap();
        assert_eq!(gpa, 0x5000);
        assert!(p.iter().all(|&b| b == 0xab));
    }

    #[test]
    fn staging_errors() {
        let mut st = Staging::new(StagingConfig {
            max_pages: 2,
            max_state_bytes: 10,
            ..cfg(4, 10)
        })
        .unwrap();
        let mut w = st.begin_epoch();
        assert_eq!(
            w.stage_page(0x1001, &page(0)).unwrap_err(),
            StagingError::Unaligned { gpa: 0x1001 }
        );
        w.stage_page(0, &page(0)).unwrap();
        w.stage_page(4096, &page(1)).unwrap();
        let e = w.stage_page(8192, &page(2)).unwrap_err();
        assert_eq!(e, StagingError::TooManyPages { max: 2, gpa: 8192 });
        assert_eq!(
            e.to_string(),
            "checkpoint already holds 2 pages, the guest's size; cannot stage the page at 0x2000"
        );
        w.stage_state(&[1; 6]).unwrap();
        assert_eq!(
            w.stage_state(&[1; 5]).unwrap_err(),
            StagingError::StateTooLarge { len: 11, max: 10 }
        );
        assert_eq!(
            w.stage_page(0, &page(0)).unwrap_err(),
            StagingError::PageAfterState { gpa: 0 }
        );
        let stats = w.finish();
        assert_eq!((stats.pages, stats.state_bytes), (2, 6));
    }

    #[test]
    fn abandoned_epoch_leaves_staging_empty() {
        let mut st = Staging::new(cfg(2, 10)).unwrap();
        stage(&mut st, 3, b"state");
        {
            let mut w = st.begin_epoch();
            w.stage_page(0, &page(9)).unwrap();
            w.stage_state(b"partial").unwrap();
            // dropped without finish
        }
        assert_eq!(st.page_count(), 0);
        assert_eq!(st.state_len(), 0);
        assert_eq!(st.payload_len(), 0);
        assert_eq!(st.slab_chunks().count(), 0);
    }

    #[test]
    fn grow_strike_halve() {
        // 1-page slabs, 3 strikes.
        let mut st = Staging::new(cfg(1, 3)).unwrap();
        assert_eq!(st.slab_count(), 1);

        // A burst of 8 pages grows the cache to 8 slabs.
        let s = stage(&mut st, 8, &[]);
        assert_eq!(
            (s.slabs_used, s.slabs_cached, s.slabs_grown, s.strikes),
            (8, 8, 7, 0)
        );

        // Two small checkpoints are strikes 1 and 2; the cache stays.
        for k in 1..=2 {
            let s = stage(&mut st, 1, &[]);
            assert_eq!(
                (s.slabs_used, s.slabs_cached, s.strikes, s.shrink_to),
                (1, 8, k, None)
            );
        }
        // A checkpoint that needs the whole cache clears the strikes.
        let s = stage(&mut st, 8, &[]);
        assert_eq!((s.slabs_grown, s.strikes), (0, 0));

        // Three strikes in a row decide a halving to 4...
        stage(&mut st, 2, &[]);
        stage(&mut st, 2, &[]);
        let s = stage(&mut st, 2, &[]);
        assert_eq!((s.strikes, s.shrink_to), (0, Some(4)));
        assert_eq!(
            st.slab_count(),
            8,
            "nothing is freed while the checkpoint is held"
        );
        // ...applied by trim once it is sent.
        assert_eq!(st.trim(), 4);
        assert_eq!(st.slab_count(), 4);
        assert_eq!(st.trim(), 0);

        // Halving continues down to the head slab, never below.
        for expect in [2, 1, 1] {
            for _ in 0..3 {
                stage(&mut st, 0, &[]);
            }
            st.trim();
            assert_eq!(st.slab_count(), expect);
        }
        // A checkpoint using the only slab is no strike.
        let s = stage(&mut st, 1, &[]);
        assert_eq!((s.slabs_cached, s.strikes, s.shrink_to), (1, 0, None));
    }

    #[test]
    fn slab_set_keeps_its_lineage_while_slabs_are_only_added() {
        let mut st = Staging::new(cfg(1, 1)).unwrap();
        let other = Staging::new(cfg(1, 1)).unwrap();
        let first = st.slab_set();
        assert_eq!(first.count(), 1);
        assert!(
            !other.slab_set().extends(&first),
            "each staging its own lineage"
        );
        stage(&mut st, 1, &[]);
        assert_eq!(st.slab_set(), first, "nothing changed");
        stage(&mut st, 4, &[]);
        let grown = st.slab_set();
        assert!(grown.extends(&first) && grown != first);
        assert_eq!(st.slab_buffers().len(), 4);
        assert!(st.slab_buffers().all(|b| b.len() == PAGE_SIZE));
        // Strike (limit 1): halve to 2, freed by trim: a new lineage.
        stage(&mut st, 1, &[]);
        assert_eq!(st.slab_set(), grown, "decided, not yet applied");
        assert_eq!(st.trim(), 2);
        let shrunk = st.slab_set();
        assert_eq!(shrunk.count(), 2);
        assert!(!shrunk.extends(&grown) && !shrunk.extends(&first));
        assert_eq!(st.slab_buffers().len(), 2);
    }

    #[test]
    fn trim_never_frees_slabs_in_use() {
        let mut st = Staging::new(cfg(1, 1)).unwrap();
        stage(&mut st, 8, &[]);
        // One strike (limit 1): halve to 4 is decided while 6 slabs are in use.
        let s = stage(&mut st, 6, &[]);
        assert_eq!(s.shrink_to, Some(4));
        assert_eq!(st.trim(), 2, "only the unused slabs go");
        assert_eq!(st.slab_count(), 6);
        assert_eq!(st.pages().count(), 6);
        // The next epoch applies the rest.
        let w = st.begin_epoch();
        drop(w);
        assert_eq!(st.slab_count(), 4);
    }

    #[test]
    fn begin_epoch_applies_pending_shrink() {
        let mut st = Staging::new(cfg(1, 1)).unwrap();
        stage(&mut st, 4, &[]);
        let s = stage(&mut st, 1, &[]);
        assert_eq!(s.shrink_to, Some(2));
        let s = stage(&mut st, 0, &[]);
        assert_eq!(s.slabs_cached, 2);
    }
}
