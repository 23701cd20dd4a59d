//! Dirty page harvesting (I3: every page written since the last checkpoint, by a vCPU or
//! by the VMM, is in the next one).
//!
//! Per memory region, the `vmm` hands over KVM's dirty log (`KVM_GET_DIRTY_LOG`: bit `i`
//! of the `u64` words is page `i` of the slot) and the region's vm-memory bitmap, which
//! records the VMM's own writes into guest memory (virtio RX buffers, block reads, used
//! rings). [`HarvestBuffer::harvest`] ORs them a word at a time into a reusable buffer,
//! clears the VMM bits it took, and counts pages per source; [`HarvestBuffer::pages`]
//! then walks the union with `trailing_zeros`. If the epoch is abandoned,
//! [`HarvestBuffer::fold_back`] sets the whole harvested set back into the VMM bitmap, so
//! the pages KVM's log no longer reports (reading it reset it) are not lost.
//!
//! Ordering: the VMM bits are cleared *before* the caller copies the pages, so a VMM write
//! racing with the harvest is either in the copy or marks the page dirty again for the
//! next epoch. (Devices are quiescent at the epoch boundary anyway, I4.)
//!
//! Nothing here allocates after [`HarvestBuffer::new`], logs, or makes system calls.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use crate::slab::PAGE_SIZE;

/// A per-page dirty bitmap that can be read and cleared a 64-page word at a time.
///
/// Implemented for vm-memory's [`AtomicBitmap`] (whose public API is per bit, so a word
/// costs 64 calls), for [`PageBitmap`] and for `[AtomicU64]` (native words).
pub trait DirtyBitmap {
    /// Number of pages tracked.
    fn page_count(&self) -> usize;
    /// Bits of pages `64 * word ..= 64 * word + 63` (bit `b` is page `64 * word + b`).
    fn load_word(&self, word: usize) -> u64;
    /// Clears the bits of `mask` in word `word`.
    fn clear_bits(&self, word: usize, mask: u64);
    /// Sets the bits of `mask` in word `word`.
    fn set_bits(&self, word: usize, mask: u64);
}

impl DirtyBitmap for AtomicBitmap {
    fn page_count(&self) -> usize {
        self.len()
    }

    #[inline]
    fn load_word(&self, word: usize) -> u64 {
        let base = word * 64;
        let n = self.len().saturating_sub(base).min(64);
        let mut w = 0u64;
        for b in 0..n {
            w |= (self.is_bit_set(base + b) as u64) << b;
        }
        w
    }

    fn clear_bits(&self, word: usize, mask: u64) {
        for b in SetBits(mask) {
            self.reset_bit(word * 64 + b as usize);
        }
    }

    fn set_bits(&self, word: usize, mask: u64) {
        for b in SetBits(mask) {
            self.set_bit(word * 64 + b as usize);
        }
    }
}

impl DirtyBitmap for [AtomicU64] {
    fn page_count(&self) -> usize {
        self.len() * 64
    }

    #[inline]
    fn load_word(&self, word: usize) -> u64 {
        self[word].load(Ordering::Acquire)
    }

    fn clear_bits(&self, word: usize, mask: u64) {
        self[word].fetch_and(!mask, Ordering::SeqCst);
    }

    fn set_bits(&self, word: usize, mask: u64) {
        self[word].fetch_or(mask, Ordering::SeqCst);
    }
}

/// A vm-memory dirty bitmap (one bit per 4 KiB page) with word access, for
/// `GuestMemoryMmap<PageBitmap>`.
///
/// vm-memory's [`AtomicBitmap`] only exposes single bits, so harvesting a 1 GiB region
/// through it costs 262 144 calls — about 0.5 ms of pause per GiB per epoch on the
/// project's machines (see `examples/stage_bench.rs`). `PageBitmap` records the VMM's
/// writes the same way (`mark_dirty` from every vm-memory write path) but is read and
/// cleared 64 pages at a time: the same harvest takes a few µs.
#[derive(Debug, Default)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: usize,
}

impl PageBitmap {
    /// A bitmap for `byte_size` bytes of guest memory (rounded up to whole pages).
    pub fn new(byte_size: usize) -> Self {
        let pages = byte_size.div_ceil(PAGE_SIZE);
        PageBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Whether page `page` is marked.
    pub fn is_page_dirty(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }
}

impl<'a> WithBitmapSlice<'a> for PageBitmap {
    type S = RefSlice<'a, PageBitmap>;
}

impl Bitmap for PageBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        // Pages past the end (and an overflowing range) are ignored, as AtomicBitmap does.
        let last = (offset.saturating_add(len - 1) / PAGE_SIZE).min(self.pages.saturating_sub(1));
        if first > last || first >= self.pages {
            return;
        }
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            self.words[w].fetch_or(mask, Ordering::SeqCst);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_page_dirty(offset / PAGE_SIZE)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, PageBitmap> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for PageBitmap {
    fn with_len(len: usize) -> Self {
        PageBitmap::new(len)
    }
}

impl DirtyBitmap for PageBitmap {
    fn page_count(&self) -> usize {
        self.pages
    }

    #[inline]
    fn load_word(&self, word: usize) -> u64 {
        self.words[word].load(Ordering::Acquire)
    }

    fn clear_bits(&self, word: usize, mask: u64) {
        self.words[word].fetch_and(!mask, Ordering::SeqCst);
    }

    fn set_bits(&self, word: usize, mask: u64) {
        self.words[word].fetch_or(mask, Ordering::SeqCst);
    }
}

/// The set bits of one word, lowest first.
#[derive(Clone, Copy, Debug)]
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// Dirty pages of one harvest, by source, for the epoch metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyCounts {
    /// Pages only KVM's log reported (vCPU writes).
    pub vcpu_only: u64,
    /// Pages only the VMM's bitmap reported (device emulation writes).
    pub vmm_only: u64,
    /// Pages both reported.
    pub both: u64,
}

impl DirtyCounts {
    /// All dirty pages.
    pub fn total(&self) -> u64 {
        self.vcpu_only + self.vmm_only + self.both
    }

    /// Adds another region's counts.
    pub fn add(&mut self, other: DirtyCounts) {
        self.vcpu_only += other.vcpu_only;
        self.vmm_only += other.vmm_only;
        self.both += other.both;
    }
}

/// Errors of a harvest: bitmaps that do not match the region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyError {
    /// KVM's log has the wrong number of words for the region.
    #[error(
        "KVM dirty log of {got} words does not match a region of {pages} pages ({want} words)"
    )]
    KvmLogSize {
        /// Words given.
        got: usize,
        /// Words expected.
        want: usize,
        /// Pages in the region.
        pages: usize,
    },
    /// The VMM bitmap tracks a different number of pages than the region has.
    #[error("VMM dirty bitmap tracks {got} pages but the region has {pages} pages (is its page size 4096?)")]
    VmmBitmapSize {
        /// Pages tracked by the bitmap.
        got: usize,
        /// Pages in the region.
        pages: usize,
    },
}

/// The harvested dirty set of one memory region, reused across epochs.
#[derive(Debug, Clone)]
pub struct HarvestBuffer {
    words: Vec<u64>,
    pages: usize,
}

impl HarvestBuffer {
    /// A buffer for a region of `pages` 4 KiB pages (the only allocation).
    pub fn new(pages: usize) -> Self {
        HarvestBuffer {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Pages in the region.
    pub fn region_pages(&self) -> usize {
        self.pages
    }

    /// Replaces the buffer's contents with `kvm | vmm`, clears in `vmm` the bits it took,
    /// and counts the pages per source. Bits past the region's last page are ignored.
    ///
    /// The VMM bitmap may be larger than the region only by its word-rounding; KVM's log
    /// must have exactly `ceil(pages / 64)` words. On error nothing is changed.
    pub fn harvest<B: DirtyBitmap + ?Sized>(
        &mut self,
        kvm: &[u64],
        vmm: &B,
    ) -> Result<DirtyCounts, DirtyError> {
        if kvm.len() != self.words.len() {
            return Err(DirtyError::KvmLogSize {
                got: kvm.len(),
                want: self.words.len(),
                pages: self.pages,
            });
        }
        let vmm_pages = vmm.page_count();
        if vmm_pages < self.pages || vmm_pages.div_ceil(64) != self.words.len() {
            return Err(DirtyError::VmmBitmapSize {
                got: vmm_pages,
                pages: self.pages,
            });
        }
        let mut counts = DirtyCounts::default();
        let last = self.words.len().wrapping_sub(1);
        let tail = match self.pages % 64 {
            0 => u64::MAX,
            r => (1u64 << r) - 1,
        };
        for (i, (out, &k)) in self.words.iter_mut().zip(kvm).enumerate() {
            let mask = if i == last { tail } else { u64::MAX };
            let k = k & mask;
            let m = vmm.load_word(i) & mask;
            if m != 0 {
                vmm.clear_bits(i, m);
                counts.vmm_only += u64::from((m & !k).count_ones());
                counts.both += u64::from((m & k).count_ones());
            }
            if k != 0 {
                counts.vcpu_only += u64::from((k & !m).count_ones());
            }
            *out = k | m;
        }
        Ok(counts)
    }

    /// The harvested pages (page numbers within the region), ascending.
    pub fn pages(&self) -> DirtyPages<'_> {
        DirtyPages::new(&self.words)
    }

    /// Number of harvested pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether page `page` was harvested.
    pub fn contains(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// The harvested set as bitmap words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Sets every harvested page back into `vmm`, for an abandoned epoch: the next harvest
    /// reports them again. (KVM's log was reset when it was read, so the VMM bitmap is the
    /// one place left to keep them.)
    pub fn fold_back<B: DirtyBitmap + ?Sized>(&self, vmm: &B) {
        for (i, &w) in self.words.iter().enumerate() {
            if w != 0 {
                vmm.set_bits(i, w);
            }
        }
    }

    /// Empties the buffer.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }
}

/// Iterator over the set bits of a bitmap (page numbers), a word at a time.
#[derive(Debug, Clone)]
pub struct DirtyPages<'a> {
    words: &'a [u64],
    next_word: usize,
    base: usize,
    cur: u64,
}

impl<'a> DirtyPages<'a> {
    /// Iterates the set bits of `words` (bit `b` of word `w` is page `64 * w + b`).
    pub fn new(words: &'a [u64]) -> Self {
        DirtyPages {
            words,
            next_word: 0,
            base: 0,
            cur: 0,
        }
    }
}

impl Iterator for DirtyPages<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.cur == 0 {
            let w = *self.words.get(self.next_word)?;
            self.base = self.next_word * 64;
            self.next_word += 1;
            self.cur = w;
        }
        let b = self.cur.trailing_zeros() as usize;
        self.cur &= self.cur - 1;
        Some(self.base + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;
    use vm_memory::{
        Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion,
    };

    fn bitmap(pages: usize) -> AtomicBitmap {
        AtomicBitmap::new(pages * 4096, NonZeroUsize::new(4096).unwrap())
    }

    #[test]
    fn iterates_set_bits() {
        let words = [0b1001u64, 0, 1 << 63, u64::MAX];
        let got: Vec<usize> = DirtyPages::new(&words).collect();
        let mut want = vec![0, 3, 191];
        want.extend(192..256);
        assert_eq!(got, want);
        assert_eq!(DirtyPages::new(&[]).count(), 0);
        assert_eq!(DirtyPages::new(&[0, 0]).count(), 0);
    }

    #[test]
    fn union_counts_and_clears_vmm_bits() {
        let pages = 200;
        let vmm = bitmap(pages);
        let mut kvm = vec![0u64; 4];
        for p in [1usize, 5, 64, 130] {
            kvm[p / 64] |= 1 << (p % 64);
        }
        for p in [5usize, 7, 199] {
            vmm.set_bit(p);
        }
        // A stray KVM bit past the region's end is ignored.
        kvm[3] |= 1 << 20;
        let mut h = HarvestBuffer::new(pages);
        let c = h.harvest(&kvm, &vmm).unwrap();
        assert_eq!(
            c,
            DirtyCounts {
                vcpu_only: 3,
                vmm_only: 2,
                both: 1
            }
        );
        assert_eq!(c.total(), 6);
        assert_eq!(h.pages().collect::<Vec<_>>(), vec![1, 5, 7, 64, 130, 199]);
        assert_eq!(h.count(), 6);
        assert!(h.contains(199) && !h.contains(2) && !h.contains(10_000));
        assert!(
            (0..pages).all(|p| !vmm.is_bit_set(p)),
            "harvested VMM bits are cleared"
        );

        // Abandoned epoch: everything comes back through the VMM bitmap.
        h.fold_back(&vmm);
        let mut h2 = HarvestBuffer::new(pages);
        let c2 = h2.harvest(&[0; 4], &vmm).unwrap();
        assert_eq!(
            c2,
            DirtyCounts {
                vcpu_only: 0,
                vmm_only: 6,
                both: 0
            }
        );
        assert_eq!(h2.words(), h.words());
    }

    #[test]
    fn atomic_u64_words_work_too() {
        let vmm: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
        vmm[1].store(0b110, Ordering::Relaxed);
        let mut h = HarvestBuffer::new(128);
        let c = h.harvest(&[0b10, 0b10], &vmm[..]).unwrap();
        assert_eq!(
            c,
            DirtyCounts {
                vcpu_only: 1,
                vmm_only: 1,
                both: 1
            }
        );
        assert_eq!(vmm[1].load(Ordering::Relaxed), 0);
        assert_eq!(h.pages().collect::<Vec<_>>(), vec![1, 65, 66]);
    }

    #[test]
    fn size_mismatches_are_errors() {
        let mut h = HarvestBuffer::new(100);
        let e = h.harvest(&[0; 3], &bitmap(100)).unwrap_err();
        assert_eq!(
            e,
            DirtyError::KvmLogSize {
                got: 3,
                want: 2,
                pages: 100
            }
        );
        assert_eq!(
            e.to_string(),
            "KVM dirty log of 3 words does not match a region of 100 pages (2 words)"
        );
        let e = h.harvest(&[0; 2], &bitmap(50)).unwrap_err();
        assert_eq!(
            e,
            DirtyError::VmmBitmapSize {
                got: 50,
                pages: 100
            }
        );
    }

    #[test]
    fn page_bitmap_marks_ranges() {
        let b = PageBitmap::new(200 * 4096 + 1); // 201 pages
        assert_eq!(b.page_count(), 201);
        b.mark_dirty(4095, 2); // pages 0 and 1
        b.mark_dirty(60 * 4096, 10 * 4096); // pages 60..=69, across a word boundary
        b.mark_dirty(200 * 4096, 1 << 20); // the last page; the rest is past the end
        b.mark_dirty(usize::MAX - 5, 100); // overflow: ignored
        b.mark_dirty(10 * 4096, 0); // empty: ignored
        let mut want = vec![0, 1];
        want.extend(60..70);
        want.push(200);
        let got: Vec<usize> = (0..300).filter(|&p| b.is_page_dirty(p)).collect();
        assert_eq!(got, want);
        assert!(b.dirty_at(65 * 4096 + 7) && !b.dirty_at(70 * 4096));
        let mut h = HarvestBuffer::new(201);
        let c = h.harvest(&[0; 4], &b).unwrap();
        assert_eq!(c.vmm_only, 13);
        assert_eq!(h.pages().collect::<Vec<_>>(), want);
        assert!((0..201).all(|p| !b.is_page_dirty(p)));
    }

    /// I3 with the word-access bitmap: vm-memory's write paths mark it.
    #[test]
    fn vmm_write_into_page_bitmap_memory_is_harvested() {
        let mem: GuestMemoryMmap<PageBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 * 4096)]).unwrap();
        mem.write_obj(1u64, GuestAddress(5 * 4096 + 4092)).unwrap(); // pages 5 and 6
        mem.write_slice(&[1; 3 * 4096], GuestAddress(100 * 4096))
            .unwrap(); // 100..=102
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let mmap: &MmapRegion<PageBitmap> = region;
        let mut h = HarvestBuffer::new(128);
        let c = h.harvest(&[1 << 7, 0], mmap.bitmap()).unwrap();
        assert_eq!(h.pages().collect::<Vec<_>>(), vec![5, 6, 7, 100, 101, 102]);
        assert_eq!(
            c,
            DirtyCounts {
                vcpu_only: 1,
                vmm_only: 5,
                both: 0
            }
        );
    }

    /// I3: a write the VMM makes through vm-memory (as a device does into an RX buffer)
    /// is in the harvest even though KVM's log knows nothing of it.
    #[test]
    fn vmm_write_through_guest_memory_is_harvested() {
        let base = 0x10_0000u64;
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(base), 64 * 4096)]).unwrap();
        let region = mem.find_region(GuestAddress(base)).unwrap();
        // The region's own bitmap (through its MmapRegion, not the trait's slice view).
        let mmap: &MmapRegion<AtomicBitmap> = region;
        let vmm_bits: &AtomicBitmap = mmap.bitmap();
        let pages = (region.len() / 4096) as usize;

        // A u32 written across the boundary of pages 9 and 10, and a byte on page 40.
        mem.write_obj(0xdead_beefu32, GuestAddress(base + 10 * 4096 - 2))
            .unwrap();
        mem.write_obj(7u8, GuestAddress(base + 40 * 4096 + 123))
            .unwrap();

        let kvm = [1u64 << 40 | 1 << 3]; // vCPUs wrote pages 3 and 40
        let mut h = HarvestBuffer::new(pages);
        let c = h.harvest(&kvm, vmm_bits).unwrap();
        assert_eq!(h.pages().collect::<Vec<_>>(), vec![3, 9, 10, 40]);
        assert_eq!(
            c,
            DirtyCounts {
                vcpu_only: 1,
                vmm_only: 2,
                both: 1
            }
        );
        // Harvested: the next epoch starts clean.
        let c = h.harvest(&[0], vmm_bits).unwrap();
        assert_eq!(c.total(), 0);
    }
}
