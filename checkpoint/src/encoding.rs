//! How pages cross the wire: fewer bytes than 4 KiB each where the standby can rebuild
//! them (docs/design.md "Wire protocol", "Page encoding").
//!
//! Every page of a checkpoint has a *kind*, carried in the low 12 bits of its page-index
//! entry (a gpa is page aligned, so those bits are free):
//!
//! - [`PageKind::Raw`]: its 4096 bytes follow in the frame's raw-page section;
//! - [`PageKind::Zero`]: the page is all zero; nothing else is sent;
//! - [`PageKind::Delta`]: the page differs from the copy the standby holds (the content
//!   this primary last sent for it) in a few runs of bytes; a *delta record* in the
//!   frame's delta section carries those runs.
//!
//! # Delta records (the XBZRLE run encoding, as in QEMU and Remus's compression)
//!
//! ```text
//! len u16 | base_crc u32 | runs (len bytes)
//! runs:    (skip uleb128 | count uleb128 | count bytes)*
//! ```
//!
//! The runs walk the page from offset 0: `skip` bytes are unchanged (their XOR against
//! the previous content is zero), then `count` bytes (≥ 1) are the page's new bytes
//! there. Bytes after the last run are unchanged. Each varint is 1 or 2 bytes (every value
//! is at most 4096); `len` is at most [`MAX_DELTA_LEN`] (a longer delta is not worth
//! decoding: the encoder sends such a page raw). `base_crc` is the CRC-32 of the previous
//! content the runs apply to: the standby checks it against its own copy before it
//! applies anything, so a sender whose cache ever disagreed with the standby's memory is
//! a typed error, never silently wrong memory.
//!
//! [`check_delta`] validates a record's runs without touching memory (every run inside
//! the page, no empty run, no overlong varint, exact length); [`runs`] walks them.
//!
//! # The sender's cache
//!
//! A delta needs the previous content, so the primary keeps what it sent recently in a
//! [`PageCache`] of bounded size (`--ft-cache-mib`). The [`Encoder`] runs after the guest
//! resumed (never in the pause), on the pages the pause copied into the staging: for each
//! page it checks for zero, looks the page up, tries a delta, and leaves the cache holding
//! exactly the content it sent (what the standby will have once it applies the
//! checkpoint). A checkpoint that is not applied means the pairing is lost, and every new
//! pairing starts with [`Encoder::reset`] and a full sync.
//!
//! Pages whose delta did not pay (more than half of them changed) are marked *cold*, sent
//! raw and not cached for a while, so incompressible memory costs a word test per page
//! instead of a copy into the cache and a failed comparison every epoch.

use crate::slab::{Page, Staging, PAGE_SIZE};

/// Bits of a page-index entry that carry the page's kind.
pub const KIND_MASK: u64 = PAGE_SIZE as u64 - 1;
/// Length of a delta record's header: `len u16 | base_crc u32`.
pub const DELTA_HEADER_LEN: usize = 6;
/// Longest run list a delta record may carry (the encoder sends the page raw instead).
pub const MAX_DELTA_LEN: usize = PAGE_SIZE / 2;
/// Longest delta record.
pub const MAX_DELTA_RECORD: usize = DELTA_HEADER_LEN + MAX_DELTA_LEN;
/// Default size of the sender's cache of recently sent pages: 64 MiB (as QEMU's XBZRLE).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// How a page crosses the wire (the low bits of its index entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// 4096 bytes in the raw-page section.
    Raw = 0,
    /// All zero: nothing else is sent.
    Zero = 1,
    /// A delta record against the standby's copy.
    Delta = 2,
}

impl PageKind {
    /// The kind an index entry's low bits name, if any.
    pub fn of_entry(entry: u64) -> Option<Self> {
        match entry & KIND_MASK {
            0 => Some(PageKind::Raw),
            1 => Some(PageKind::Zero),
            2 => Some(PageKind::Delta),
            _ => None,
        }
    }
}

/// A page of a received checkpoint, as the standby applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData<'a> {
    /// The page's bytes.
    Raw(&'a Page),
    /// All zero.
    Zero,
    /// Runs of new bytes against the copy whose CRC-32 is `base_crc` (checked runs).
    Delta {
        /// CRC-32 of the content the runs apply to.
        base_crc: u32,
        /// The runs (see [`apply_runs`]).
        runs: &'a [u8],
    },
}

/// Why a delta record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A varint is longer than 2 bytes, or cut off.
    #[error("bad varint at byte {at} of the run list")]
    Varint {
        /// Offset in the run list.
        at: usize,
    },
    /// A run of zero bytes.
    #[error("empty run at page offset {offset}")]
    EmptyRun {
        /// Page offset where it would start.
        offset: usize,
    },
    /// A run that reaches past the end of the page.
    #[error("run of {len} bytes at page offset {offset} goes past the {PAGE_SIZE}-byte page")]
    PastPage {
        /// Page offset of the run.
        offset: usize,
        /// Its length.
        len: usize,
    },
    /// A run's bytes are cut off by the end of the record.
    #[error(
        "run of {len} bytes at page offset {offset} is cut off ({left} bytes left in the record)"
    )]
    Truncated {
        /// Page offset of the run.
        offset: usize,
        /// Its length.
        len: usize,
        /// Bytes left in the record.
        left: usize,
    },
    /// The record's header claims more than the limit.
    #[error("delta record of {len} bytes exceeds the limit of {MAX_DELTA_LEN}")]
    TooLong {
        /// Length claimed.
        len: usize,
    },
}

/// Why a delta section was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeltaSectionError {
    /// The delta section ends inside a record.
    #[error("delta record {record} claims {need} bytes, {left} remain in the delta section")]
    SectionShort {
        /// Which record (0-based, in index order).
        record: usize,
        /// Bytes it needs (header and runs).
        need: usize,
        /// Bytes left.
        left: usize,
    },
    /// The delta section holds bytes after the last record.
    #[error("{extra} bytes after the last delta record")]
    Trailing {
        /// Bytes left over.
        extra: usize,
    },
    /// A record's runs are malformed.
    #[error("delta record {record}: {source}")]
    Record {
        /// Which record (0-based, in index order).
        record: usize,
        /// What is wrong.
        #[source]
        source: DeltaError,
    },
}

/// Whether every byte of `page` is zero (64-byte blocks of words, stopping at the first
/// non-zero block).
#[inline]
pub fn is_zero(page: &Page) -> bool {
    page.chunks_exact(64).all(|block| {
        block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

#[inline]
fn word(p: &Page, i: usize) -> u64 {
    p[i..]
        .first_chunk::<8>()
        .map_or(0, |w| u64::from_ne_bytes(*w))
}

/// Bytes compared at once while skipping unchanged stretches.
const BLOCK: usize = 256;

/// Whether the `BLOCK` bytes at `i` are equal in `a` and `b` (one `bcmp`, vectorized by
/// the C library).
#[inline]
fn block_equal(a: &Page, b: &Page, i: usize) -> bool {
    a.get(i..i + BLOCK) == b.get(i..i + BLOCK)
}

/// Whether any byte of `x` is zero.
#[inline]
fn has_zero_byte(x: u64) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    x.wrapping_sub(LO) & !x & HI != 0
}

fn put_varint(out: &mut [u8], at: usize, v: usize) -> usize {
    if v < 0x80 {
        out[at] = v as u8;
        1
    } else {
        out[at] = (v as u8 & 0x7f) | 0x80;
        out[at + 1] = (v >> 7) as u8;
        2
    }
}

fn varint_len(v: usize) -> usize {
    if v < 0x80 {
        1
    } else {
        2
    }
}

/// Reads a 1- or 2-byte varint at `*at`.
fn get_varint(b: &[u8], at: &mut usize) -> Result<usize, DeltaError> {
    let start = *at;
    let bad = DeltaError::Varint { at: start };
    let b0 = *b.get(start).ok_or(bad)?;
    if b0 & 0x80 == 0 {
        *at += 1;
        return Ok(usize::from(b0));
    }
    let b1 = *b.get(start + 1).ok_or(bad)?;
    if b1 & 0x80 != 0 {
        return Err(bad);
    }
    *at += 2;
    Ok(usize::from(b0 & 0x7f) | usize::from(b1) << 7)
}

/// Equal bytes at which a run of changed bytes ends: a shorter stretch of equal bytes is
/// cheaper to send inside the run than as a new skip and count.
const RUN_BREAK: usize = 3;

/// Encodes `new` against `old` as a run list into `out`; returns its length, or `None`
/// when it would exceed [`MAX_DELTA_LEN`] (send the page raw). An unchanged page is an
/// empty run list.
pub fn encode_delta(old: &Page, new: &Page, out: &mut [u8; MAX_DELTA_LEN]) -> Option<usize> {
    let mut len = 0;
    let mut i = 0;
    let mut run_end = 0; // end of the last run written
    while i < PAGE_SIZE {
        // Unchanged bytes: whole equal blocks, then words, then bytes.
        while i % BLOCK == 0 && i + BLOCK <= PAGE_SIZE && block_equal(old, new, i) {
            i += BLOCK;
        }
        while i + 8 <= PAGE_SIZE && word(old, i) == word(new, i) {
            i += 8;
        }
        while i < PAGE_SIZE && old[i] == new[i] {
            i += 1;
        }
        if i == PAGE_SIZE {
            break;
        }
        // Changed bytes from i: words whose bytes all differ in one step.
        let start = i;
        loop {
            if i + 8 <= PAGE_SIZE && !has_zero_byte(word(old, i) ^ word(new, i)) {
                i += 8;
            } else if i < PAGE_SIZE && old[i] != new[i] {
                i += 1;
            } else {
                // Equal bytes at i: the run ends unless they are few and more changes follow.
                let mut k = i;
                while k < PAGE_SIZE && k - i < RUN_BREAK && old[k] == new[k] {
                    k += 1;
                }
                if k == PAGE_SIZE || k - i >= RUN_BREAK {
                    break;
                }
                i = k;
            }
            // Give up as soon as the runs cannot fit.
            if len + 4 + (i - start) > MAX_DELTA_LEN {
                return None;
            }
        }
        let (skip, count) = (start - run_end, i - start);
        let need = varint_len(skip) + varint_len(count) + count;
        if len + need > MAX_DELTA_LEN {
            return None;
        }
        len += put_varint(out, len, skip);
        len += put_varint(out, len, count);
        out[len..len + count].copy_from_slice(&new[start..i]);
        len += count;
        run_end = i;
    }
    Some(len)
}

/// The runs of a run list: `(page offset, new bytes)` in order, or the first error (after
/// which it ends).
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    runs: &'a [u8],
    at: usize,
    offset: usize,
}

/// Iterates the runs of the run list `runs` (see [`Runs`]).
pub fn runs(runs: &[u8]) -> Runs<'_> {
    Runs {
        runs,
        at: 0,
        offset: 0,
    }
}

impl<'a> Runs<'a> {
    fn step(&mut self) -> Result<(usize, &'a [u8]), DeltaError> {
        let skip = get_varint(self.runs, &mut self.at)?;
        let len = get_varint(self.runs, &mut self.at)?;
        let offset = self.offset + skip;
        if len == 0 {
            return Err(DeltaError::EmptyRun { offset });
        }
        if offset + len > PAGE_SIZE {
            return Err(DeltaError::PastPage { offset, len });
        }
        let Some(bytes) = self.runs.get(self.at..self.at + len) else {
            let left = self.runs.len() - self.at;
            return Err(DeltaError::Truncated { offset, len, left });
        };
        self.at += len;
        self.offset = offset + len;
        Ok((offset, bytes))
    }
}

impl<'a> Iterator for Runs<'a> {
    type Item = Result<(usize, &'a [u8]), DeltaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.runs.len() {
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.at = self.runs.len();
        }
        Some(r)
    }
}

/// Checks a run list: every run non-empty and inside the page, every varint well formed,
/// every byte accounted for, at most [`MAX_DELTA_LEN`] bytes. Touches no memory but
/// `list`.
pub fn check_delta(list: &[u8]) -> Result<(), DeltaError> {
    if list.len() > MAX_DELTA_LEN {
        return Err(DeltaError::TooLong { len: list.len() });
    }
    runs(list).try_for_each(|r| r.map(drop))
}

/// Applies a run list to `page` in place. A malformed list is an error and leaves `page`
/// untouched.
pub fn apply_runs(page: &mut Page, list: &[u8]) -> Result<(), DeltaError> {
    check_delta(list)?;
    for (offset, bytes) in runs(list).map_while(Result::ok) {
        page[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    Ok(())
}

/// Writes a delta record header for a run list of `len` bytes against `base_crc`.
pub fn delta_header(len: usize, base_crc: u32) -> [u8; DELTA_HEADER_LEN] {
    let mut h = [0u8; DELTA_HEADER_LEN];
    h[0..2].copy_from_slice(&(len as u16).to_le_bytes());
    h[2..6].copy_from_slice(&base_crc.to_le_bytes());
    h
}

/// The records of a delta section, each with its run list checked: `(base_crc, runs)`.
#[derive(Debug, Clone)]
pub struct DeltaRecords<'a> {
    bytes: &'a [u8],
    record: usize,
}

impl<'a> DeltaRecords<'a> {
    /// The records of the delta section `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        DeltaRecords { bytes, record: 0 }
    }

    /// Checks that the section holds exactly `count` well-formed records.
    pub fn check(bytes: &'a [u8], count: usize) -> Result<(), DeltaSectionError> {
        let mut it = DeltaRecords::new(bytes);
        for _ in 0..count {
            let (_, runs) = it.next_record()?;
            check_delta(runs).map_err(|source| DeltaSectionError::Record {
                record: it.record - 1,
                source,
            })?;
        }
        if !it.bytes.is_empty() {
            return Err(DeltaSectionError::Trailing {
                extra: it.bytes.len(),
            });
        }
        Ok(())
    }

    /// The next record's base CRC and (unchecked) run list.
    pub fn next_record(&mut self) -> Result<(u32, &'a [u8]), DeltaSectionError> {
        let record = self.record;
        let left = self.bytes.len();
        let Some(h) = self.bytes.get(..DELTA_HEADER_LEN) else {
            return Err(DeltaSectionError::SectionShort {
                record,
                need: DELTA_HEADER_LEN,
                left,
            });
        };
        let len = usize::from(u16::from_le_bytes([h[0], h[1]]));
        let base_crc = u32::from_le_bytes([h[2], h[3], h[4], h[5]]);
        if len > MAX_DELTA_LEN {
            return Err(DeltaSectionError::Record {
                record,
                source: DeltaError::TooLong { len },
            });
        }
        let Some(runs) = self.bytes.get(DELTA_HEADER_LEN..DELTA_HEADER_LEN + len) else {
            return Err(DeltaSectionError::SectionShort {
                record,
                need: DELTA_HEADER_LEN + len,
                left,
            });
        };
        self.bytes = &self.bytes[DELTA_HEADER_LEN + len..];
        self.record += 1;
        Ok((base_crc, runs))
    }
}

/// Ways per set of the [`PageCache`].
const WAYS: usize = 4;

/// The sender's cache of the pages it sent recently, as it sent them: 4-way set
/// associative by guest page number, least recently used way replaced. Its memory is
/// allocated zeroed once (committed only as it fills); lookups and updates never
/// allocate.
#[derive(Debug)]
pub struct PageCache {
    sets_log2: u32,
    /// Guest page number + 1 of each way; 0: empty.
    tags: Box<[u64]>,
    /// Last use of each way.
    stamps: Box<[u32]>,
    /// The ways' pages, back to back. Bytes, not `[Page]`: `vec!` of zero bytes takes
    /// the calloc path, so untouched ways cost no memory (it would fill page arrays in).
    data: Box<[u8]>,
    clock: u32,
}

impl PageCache {
    /// A cache of at most `bytes` bytes of pages (rounded down to a power of two of sets);
    /// `None` when that is not even one set.
    pub fn new(bytes: u64) -> Option<Self> {
        let pages = bytes / PAGE_SIZE as u64;
        let sets = pages / WAYS as u64;
        if sets == 0 {
            return None;
        }
        let sets_log2 = 63 - sets.leading_zeros();
        let ways = (1usize << sets_log2) * WAYS;
        Some(PageCache {
            sets_log2,
            tags: vec![0; ways].into_boxed_slice(),
            stamps: vec![0; ways].into_boxed_slice(),
            data: vec![0u8; ways * PAGE_SIZE].into_boxed_slice(),
            clock: 0,
        })
    }

    /// Pages it holds at most.
    pub fn capacity(&self) -> usize {
        self.tags.len()
    }

    /// Forgets every page.
    pub fn clear(&mut self) {
        self.tags.fill(0);
        self.stamps.fill(0);
        self.clock = 0;
    }

    fn set_of(&self, pfn: u64) -> usize {
        if self.sets_log2 == 0 {
            return 0;
        }
        (pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - self.sets_log2)) as usize * WAYS
    }

    fn touch(&mut self, slot: usize) {
        self.clock = self.clock.wrapping_add(1);
        self.stamps[slot] = self.clock;
    }

    /// The slot holding the page at `gpa`, if cached.
    pub fn lookup(&mut self, gpa: u64) -> Option<usize> {
        let pfn = gpa / PAGE_SIZE as u64;
        let set = self.set_of(pfn);
        let slot = (set..set + WAYS).find(|&s| self.tags[s] == pfn + 1)?;
        self.touch(slot);
        Some(slot)
    }

    /// A slot for the page at `gpa` (not cached), evicting the set's least recently used
    /// page; its content is the caller's to write.
    pub fn insert(&mut self, gpa: u64) -> usize {
        let pfn = gpa / PAGE_SIZE as u64;
        let set = self.set_of(pfn);
        let clock = self.clock;
        let slot = (set..set + WAYS)
            .max_by_key(|&s| {
                if self.tags[s] == 0 {
                    u32::MAX
                } else {
                    clock.wrapping_sub(self.stamps[s])
                }
            })
            .unwrap_or(set);
        self.tags[slot] = pfn + 1;
        self.touch(slot);
        slot
    }

    /// Forgets the page in `slot`.
    pub fn remove(&mut self, slot: usize) {
        self.tags[slot] = 0;
    }

    /// The content of `slot` (a slot this cache returned).
    pub fn page(&self, slot: usize) -> &Page {
        self.data[slot * PAGE_SIZE..]
            .first_chunk()
            .expect("a slot of this cache")
    }

    /// The content of `slot`, to update.
    pub fn page_mut(&mut self, slot: usize) -> &mut Page {
        self.data[slot * PAGE_SIZE..]
            .first_chunk_mut()
            .expect("a slot of this cache")
    }
}

/// What encoding one checkpoint did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages sent raw.
    pub raw: u64,
    /// Pages sent as a zero flag.
    pub zero: u64,
    /// Pages sent as a delta.
    pub delta: u64,
    /// Bytes of the delta section.
    pub delta_bytes: u64,
    /// Pages found in the cache.
    pub hits: u64,
    /// Pages whose delta was too long (sent raw, then cold).
    pub overflows: u64,
}

/// Encodes staged checkpoints for the wire (see the module documentation): zero pages
/// as a flag, cached pages as deltas, the rest raw; keeps the cache equal to what was
/// sent.
#[derive(Debug)]
pub struct Encoder {
    cache: Option<PageCache>,
    /// One bit per guest page: its last delta did not pay; send it raw, uncached.
    cold: Vec<u64>,
    /// Next word of `cold` to clear: a page stays cold for [`COLD_EPOCHS`] encodes.
    sweep: usize,
    scratch: Box<[u8; MAX_DELTA_LEN]>,
}

/// Encodes after which a cold page is tried again.
pub const COLD_EPOCHS: usize = 64;

impl Encoder {
    /// An encoder with a cache of `cache_bytes` (0: no deltas, zero pages only) for a
    /// guest whose memory ends below `gpa_end`.
    pub fn new(cache_bytes: u64, gpa_end: u64) -> Self {
        let pages = gpa_end.div_ceil(PAGE_SIZE as u64) as usize;
        let cache = PageCache::new(cache_bytes);
        Encoder {
            cold: if cache.is_some() {
                vec![0; pages.div_ceil(64)]
            } else {
                Vec::new()
            },
            cache,
            sweep: 0,
            scratch: Box::new([0; MAX_DELTA_LEN]),
        }
    }

    /// Pages the cache holds at most (0 without one).
    pub fn cache_capacity(&self) -> usize {
        self.cache.as_ref().map_or(0, PageCache::capacity)
    }

    /// Forgets everything sent: a new pairing, whose standby holds none of it.
    pub fn reset(&mut self) {
        if let Some(c) = &mut self.cache {
            c.clear();
        }
        self.cold.fill(0);
        self.sweep = 0;
    }

    fn is_cold(&self, pfn: usize) -> bool {
        self.cold
            .get(pfn / 64)
            .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
    }

    fn set_cold(&mut self, pfn: usize) {
        if let Some(w) = self.cold.get_mut(pfn / 64) {
            *w |= 1 << (pfn % 64);
        }
    }

    /// Encodes the checkpoint staged in `staging` (its pages as copied in the pause):
    /// sets each page's kind and fills the delta section; the cache then holds what was
    /// sent. Runs while the guest runs; allocates nothing once the staging's delta buffer
    /// has grown to the checkpoint's size. A staging encoded already is left as it is.
    ///
    /// Each page may be staged at most once per checkpoint (a harvest yields each dirty
    /// page once): the standby checks every delta against its copy from before the
    /// checkpoint, so a second delta of the same page in one checkpoint would be refused.
    pub fn encode(&mut self, staging: &mut Staging) -> EncodeStats {
        let mut stats = EncodeStats::default();
        // A slice of the cold bitmap thaws at every encode.
        let words = self.cold.len().div_ceil(COLD_EPOCHS).max(1);
        if !self.cold.is_empty() {
            let end = (self.sweep + words).min(self.cold.len());
            self.cold[self.sweep..end].fill(0);
            self.sweep = if end == self.cold.len() { 0 } else { end };
        }
        staging.encode_with(|gpa, page, delta| {
            let kind = self.classify(gpa, page, delta, &mut stats);
            match kind {
                PageKind::Raw => stats.raw += 1,
                PageKind::Zero => stats.zero += 1,
                PageKind::Delta => stats.delta += 1,
            }
            kind
        });
        stats.delta_bytes = staging.delta_bytes().len() as u64;
        stats
    }

    fn classify(
        &mut self,
        gpa: u64,
        page: &Page,
        delta: &mut Vec<u8>,
        stats: &mut EncodeStats,
    ) -> PageKind {
        let pfn = (gpa / PAGE_SIZE as u64) as usize;
        if is_zero(page) {
            // The standby's copy becomes zero: so does a cached one.
            if let Some(c) = &mut self.cache {
                if let Some(slot) = c.lookup(gpa) {
                    c.page_mut(slot).fill(0);
                }
            }
            return PageKind::Zero;
        }
        if self.cache.is_none() || self.is_cold(pfn) {
            return PageKind::Raw;
        }
        let Some(cache) = &mut self.cache else {
            return PageKind::Raw;
        };
        let Some(slot) = cache.lookup(gpa) else {
            let slot = cache.insert(gpa);
            cache.page_mut(slot).copy_from_slice(page);
            return PageKind::Raw;
        };
        stats.hits += 1;
        match encode_delta(cache.page(slot), page, &mut self.scratch) {
            Some(len) => {
                let base_crc = crc32fast::hash(cache.page(slot));
                delta.extend_from_slice(&delta_header(len, base_crc));
                delta.extend_from_slice(&self.scratch[..len]);
                // The cached copy becomes what the standby will hold: only the runs change.
                let cached = cache.page_mut(slot);
                let _ = apply_runs(cached, &self.scratch[..len]);
                PageKind::Delta
            }
            None => {
                // Most of the page changed: send it raw and stop caching it for a while.
                stats.overflows += 1;
                cache.remove(slot);
                self.set_cold(pfn);
                PageKind::Raw
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(f: impl Fn(usize) -> u8) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = f(i);
        }
        p
    }

    fn roundtrip(old: &Page, new: &Page) -> Option<usize> {
        let mut out = [0u8; MAX_DELTA_LEN];
        let len = encode_delta(old, new, &mut out)?;
        check_delta(&out[..len]).unwrap();
        let mut p = *old;
        apply_runs(&mut p, &out[..len]).unwrap();
        assert_eq!(p[..], new[..]);
        Some(len)
    }

    #[test]
    fn zero_test() {
        assert!(is_zero(&[0; PAGE_SIZE]));
        for at in [0, 7, 63, 64, 2048, 4095] {
            let mut p = [0u8; PAGE_SIZE];
            p[at] = 1;
            assert!(!is_zero(&p), "byte {at}");
        }
    }

    #[test]
    fn small_changes_are_small() {
        let old = page_with(|i| (i * 7) as u8);
        assert_eq!(roundtrip(&old, &old), Some(0), "unchanged: empty");
        let mut new = old;
        new[0] = !new[0];
        assert_eq!(roundtrip(&old, &new), Some(3)); // skip 0, count 1, 1 byte
        let mut new = old;
        new[4095] ^= 0x40;
        assert_eq!(roundtrip(&old, &new), Some(2 + 1 + 1)); // skip 4095 is 2 bytes
        let mut new = old;
        new[100..108].copy_from_slice(&u64::MAX.to_le_bytes());
        new[110] ^= 1; // two equal bytes in between: one run
        let len = roundtrip(&old, &new).unwrap();
        assert_eq!(len, 1 + 1 + 11);
    }

    #[test]
    fn incompressible_pages_overflow() {
        let old = page_with(|i| i as u8);
        let new = page_with(|i| !(i as u8));
        assert_eq!(roundtrip(&old, &new), None);
        // Half the page changed, in one run: still too long with its header.
        let new = page_with(|i| if i < 2048 { !(i as u8) } else { i as u8 });
        assert_eq!(roundtrip(&old, &new), None);
        let new = page_with(|i| if i < 2000 { !(i as u8) } else { i as u8 });
        assert_eq!(roundtrip(&old, &new), Some(2000 + 2 + 1));
    }

    #[test]
    fn hostile_runs_are_refused() {
        use DeltaError::*;
        let cases: &[(&[u8], DeltaError)] = &[
            (&[0, 0], EmptyRun { offset: 0 }),
            (&[0x80], Varint { at: 0 }),
            (&[0x80, 0x80, 0x01], Varint { at: 0 }),
            (&[0, 0x81], Varint { at: 1 }),
            (
                &[0x80, 0x20, 1, 0],
                PastPage {
                    offset: 4096,
                    len: 1,
                },
            ),
            (
                &[0xff, 0x1f, 2, 1, 2],
                PastPage {
                    offset: 4095,
                    len: 2,
                },
            ),
            (
                &[0, 5, 1, 2],
                Truncated {
                    offset: 0,
                    len: 5,
                    left: 2,
                },
            ),
            (
                &[0, 1, 9, 0x80, 0x20, 1, 1],
                PastPage {
                    offset: 4097,
                    len: 1,
                },
            ),
        ];
        for (runs, want) in cases {
            assert_eq!(check_delta(runs), Err(*want), "{runs:?}");
            let mut p = [7u8; PAGE_SIZE];
            assert_eq!(apply_runs(&mut p, runs), Err(*want));
            assert!(p.iter().all(|&b| b == 7), "nothing applied for {runs:?}");
        }
        assert_eq!(
            check_delta(&[0; MAX_DELTA_LEN + 1]),
            Err(TooLong {
                len: MAX_DELTA_LEN + 1
            })
        );
    }

    #[test]
    fn delta_sections_are_checked() {
        let mut s = Vec::new();
        s.extend_from_slice(&delta_header(3, 9));
        s.extend_from_slice(&[0, 1, 0xaa]);
        s.extend_from_slice(&delta_header(0, 1));
        assert_eq!(DeltaRecords::check(&s, 2), Ok(()));
        assert_eq!(
            DeltaRecords::check(&s, 3),
            Err(DeltaSectionError::SectionShort {
                record: 2,
                need: 6,
                left: 0
            })
        );
        assert_eq!(
            DeltaRecords::check(&s, 1),
            Err(DeltaSectionError::Trailing { extra: 6 })
        );
        let mut bad = s.clone();
        bad[0] = 4; // the first record's runs now swallow a header byte: malformed
        assert!(matches!(
            DeltaRecords::check(&bad, 2),
            Err(DeltaSectionError::Record { record: 0, .. })
        ));
        let mut long = delta_header(MAX_DELTA_LEN + 1, 0).to_vec();
        long.resize(DELTA_HEADER_LEN + MAX_DELTA_LEN + 1, 0);
        assert!(matches!(
            DeltaRecords::check(&long, 1),
            Err(DeltaSectionError::Record {
                record: 0,
                source: DeltaError::TooLong { .. }
            })
        ));
        let mut it = DeltaRecords::new(&s);
        assert_eq!(it.next_record(), Ok((9, &[0, 1, 0xaa][..])));
        assert_eq!(it.next_record(), Ok((1, &[][..])));
    }

    #[test]
    fn cache_replaces_least_recently_used() {
        // One set of 4 ways.
        let mut c = PageCache::new(4 * PAGE_SIZE as u64).unwrap();
        assert_eq!(c.capacity(), 4);
        let slots: Vec<usize> = (0..4).map(|p| c.insert(p * 4096)).collect();
        for (p, &s) in slots.iter().enumerate() {
            c.page_mut(s).fill(p as u8);
        }
        assert_eq!(c.lookup(0), Some(slots[0])); // page 0 is now the most recent
        let s = c.insert(9 * 4096); // evicts page 1
        assert_eq!(s, slots[1]);
        assert_eq!(c.lookup(4096), None);
        assert_eq!(c.lookup(0), Some(slots[0]));
        assert_eq!(c.page(slots[0])[0], 0);
        c.remove(slots[0]);
        assert_eq!(c.lookup(0), None);
        c.clear();
        assert_eq!(c.lookup(9 * 4096), None);
        assert!(PageCache::new(3 * PAGE_SIZE as u64).is_none());
    }
}
