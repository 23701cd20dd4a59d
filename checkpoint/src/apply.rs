//! Standby apply (I2).
//!
//! A [`VerifiedCheckpoint`] can only be made by [`crate::wire::FrameReader`], after the
//! whole frame arrived and its checksum matched: an unverified or partial checkpoint
//! cannot be applied, by construction. [`VerifiedCheckpoint::apply`] checks every page
//! against the guest memory map, and every delta page's base (the copy it applies to)
//! against the CRC the primary sent with it, before it writes any, so it either writes
//! all pages or none.
//!
//! Which checkpoints may be applied at all (generation and epoch fencing, I5) is decided
//! by [`crate::protocol::EpochFence`].

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::encoding::{is_zero, runs, PageData};
use crate::slab::{Chunks, Entries, EpochStats, RawPages, Staging, PAGE_SIZE};

/// A zero page, to write zero pages from.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Errors of applying a verified checkpoint to guest memory.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A page lies outside the guest's memory map (checked before anything is written).
    #[error(
        "checkpoint {epoch} page {index} at {gpa:#x} is not in guest memory; nothing was applied"
    )]
    NotInMemory {
        /// The checkpoint's epoch.
        epoch: u64,
        /// Position in the page index.
        index: usize,
        /// The page's address.
        gpa: u64,
    },
    /// A delta page's base is not what the primary encoded against: this standby's copy
    /// of the page differs from the one the primary believes it sent (checked before
    /// anything is written).
    #[error("checkpoint {epoch} page {index} at {gpa:#x} is a delta against a copy with CRC {expected:#010x}, but this standby's copy has CRC {found:#010x}; nothing was applied")]
    DeltaBase {
        /// The checkpoint's epoch.
        epoch: u64,
        /// Position in the page index.
        index: usize,
        /// The page's address.
        gpa: u64,
        /// The CRC the delta was made against.
        expected: u32,
        /// The CRC of this standby's copy.
        found: u32,
    },
    /// Reading a delta page's base failed (after validation).
    #[error("cannot read checkpoint {epoch} page at {gpa:#x} from guest memory: {source}")]
    Read {
        /// The checkpoint's epoch.
        epoch: u64,
        /// The page's address.
        gpa: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing a page failed (after validation: the memory map changed under us).
    #[error("cannot write checkpoint {epoch} page at {gpa:#x} into guest memory: {source}")]
    Write {
        /// The checkpoint's epoch.
        epoch: u64,
        /// The page's address.
        gpa: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A complete checkpoint whose checksum matched, held in the receiver's staging.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedCheckpoint<'a> {
    staging: &'a Staging,
    epoch: u64,
    generation: u64,
    stats: EpochStats,
}

impl<'a> VerifiedCheckpoint<'a> {
    /// Only the frame reader makes these, after verification.
    pub(crate) fn new(
        staging: &'a Staging,
        epoch: u64,
        generation: u64,
        stats: EpochStats,
    ) -> Self {
        VerifiedCheckpoint {
            staging,
            epoch,
            generation,
            stats,
        }
    }

    /// The checkpoint's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Each disk's records in this checkpoint (verified: the segments are
    /// well formed and name disks of the guest).
    pub fn disk_segments(&self) -> impl Iterator<Item = (u32, &'a [u8])> {
        crate::wire::DiskSegments::new(self.staging.disk_bytes()).map_while(Result::ok)
    }

    /// The checkpoint's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of pages.
    pub fn page_count(&self) -> usize {
        self.staging.page_count()
    }

    /// Pages sent raw (4096 bytes each on the wire).
    pub fn raw_count(&self) -> usize {
        self.staging.raw_count()
    }

    /// Number of state bytes.
    pub fn state_len(&self) -> usize {
        self.staging.state_len()
    }

    /// Staging statistics of the receive (slabs used, grown, strikes).
    pub fn stats(&self) -> &EpochStats {
        &self.stats
    }

    /// The raw pages with their addresses, in the order sent (every page of a checkpoint
    /// sent without encoding).
    pub fn pages(&self) -> RawPages<'a> {
        self.staging.pages()
    }

    /// Every page with its address and how it was sent, in the order sent.
    pub fn entries(&self) -> Entries<'a> {
        self.staging.entries()
    }

    /// The state bytes, as one or more chunks.
    pub fn state_chunks(&self) -> Chunks<'a> {
        self.staging.state_chunks()
    }

    /// The state bytes if they are contiguous (no copy).
    pub fn state_contiguous(&self) -> Option<&'a [u8]> {
        self.staging.state_contiguous()
    }

    /// Copies the state bytes into `out` (replacing its contents, reusing its capacity).
    pub fn copy_state_into(&self, out: &mut Vec<u8>) {
        self.staging.copy_state_into(out)
    }

    /// Writes every page into `mem` and copies the state bytes into `state_out`, returning
    /// them. First every page is checked against `mem`, and every delta page's base (this
    /// side's copy) against the CRC it was encoded against: on [`ApplyError::NotInMemory`]
    /// or [`ApplyError::DeltaBase`] nothing was written. Then raw pages are copied, zero
    /// pages zeroed (left alone where already zero, so untouched memory stays unbacked)
    /// and deltas' runs written over their bases, in the order sent.
    pub fn apply<'o, M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        state_out: &'o mut Vec<u8>,
    ) -> Result<&'o [u8], ApplyError> {
        let epoch = self.epoch;
        let mut page = [0u8; PAGE_SIZE];
        for (index, (gpa, data)) in self.entries().enumerate() {
            if !mem.check_range(GuestAddress(gpa), PAGE_SIZE, Permissions::Write) {
                return Err(ApplyError::NotInMemory { epoch, index, gpa });
            }
            if let PageData::Delta { base_crc, .. } = data {
                mem.read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|source| ApplyError::Read { epoch, gpa, source })?;
                let found = crc32fast::hash(&page);
                if found != base_crc {
                    return Err(ApplyError::DeltaBase {
                        epoch,
                        index,
                        gpa,
                        expected: base_crc,
                        found,
                    });
                }
            }
        }
        let write = |bytes: &[u8], gpa: u64| {
            mem.write_slice(bytes, GuestAddress(gpa))
                .map_err(|source| ApplyError::Write { epoch, gpa, source })
        };
        for (gpa, data) in self.entries() {
            match data {
                PageData::Raw(p) => write(p, gpa)?,
                PageData::Zero => {
                    mem.read_slice(&mut page, GuestAddress(gpa))
                        .map_err(|source| ApplyError::Read { epoch, gpa, source })?;
                    if !is_zero(&page) {
                        write(&ZERO_PAGE, gpa)?;
                    }
                }
                PageData::Delta { runs: list, .. } => {
                    // Checked when the frame arrived: every run lies inside the page.
                    for (offset, bytes) in runs(list).map_while(Result::ok) {
                        write(bytes, gpa + offset as u64)?;
                    }
                }
            }
        }
        self.copy_state_into(state_out);
        Ok(state_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::StagingConfig;
    use crate::wire::{CheckpointFrame, DevicesSummary, Frame, FrameReader, GuestShape, Limits};
    use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

    const MEM: u64 = 16 * 4096;

    fn limits() -> Limits {
        let shape = GuestShape {
            mem_bytes: MEM,
            vcpus: 1,
            cmdline: String::new(),
            devices: DevicesSummary::default(),
        };
        Limits::for_shape(&shape, MEM, 4096).unwrap()
    }

    fn frame(pages: &[(u64, u8)], state: &[u8], epoch: u64) -> Vec<u8> {
        let mut st = Staging::new(limits().staging_config()).unwrap();
        let mut w = st.begin_epoch();
        for &(gpa, fill) in pages {
            w.stage_page(gpa, &[fill; PAGE_SIZE]).unwrap();
        }
        w.stage_state(state).unwrap();
        w.finish();
        let mut v = Vec::new();
        CheckpointFrame::new(&st, epoch, 1).copy_into(&mut v);
        v
    }

    fn read_byte(mem: &GuestMemoryMmap, gpa: u64) -> u8 {
        mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    #[test]
    fn apply_writes_pages_and_returns_state() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let f = frame(&[(0x2000, 7), (0x5000, 9), (0x2000, 8)], b"vm state", 4);
        let mut rx = Staging::new(limits().staging_config()).unwrap();
        let mut reader = FrameReader::new(limits());
        let Frame::Checkpoint(v) = reader.read_frame(&mut &f[..], &mut rx).unwrap() else {
            panic!()
        };
        let mut state = Vec::new();
        assert_eq!(v.apply(&mem, &mut state).unwrap(), b"vm state");
        assert_eq!(
            read_byte(&mem, 0x2000 + 4095),
            8,
            "the later copy of a page wins"
        );
        assert_eq!(read_byte(&mem, 0x5000), 9);
        assert_eq!(read_byte(&mem, 0x3000), 0);
        assert_eq!(v.state_contiguous(), Some(&b"vm state"[..]));
    }

    #[test]
    fn apply_is_all_or_nothing() {
        // Guest memory with a hole at pages 8..12: the wire limits admit page 9, the
        // memory map does not.
        let regions = vec![
            GuestRegionMmap::from_range(GuestAddress(0), 8 * 4096, None).unwrap(),
            GuestRegionMmap::from_range(GuestAddress(12 * 4096), 4 * 4096, None).unwrap(),
        ];
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_regions(regions).unwrap();
        let f = frame(&[(0x1000, 5), (9 * 4096, 5)], b"", 1);
        let mut rx = Staging::new(limits().staging_config()).unwrap();
        let Frame::Checkpoint(v) = FrameReader::new(limits())
            .read_frame(&mut &f[..], &mut rx)
            .unwrap()
        else {
            panic!()
        };
        let e = v.apply(&mem, &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "checkpoint 1 page 1 at 0x9000 is not in guest memory; nothing was applied"
        );
        assert_eq!(
            read_byte(&mem, 0x1000),
            0,
            "the valid page was not written either"
        );
    }

    #[test]
    fn entries_see_every_page() {
        let f = frame(&[(0, 1), (0x1000, 2)], b"", 1);
        let mut rx = Staging::new(StagingConfig {
            slab_bytes: 4096,
            ..limits().staging_config()
        })
        .unwrap();
        let Frame::Checkpoint(v) = FrameReader::new(limits())
            .read_frame(&mut &f[..], &mut rx)
            .unwrap()
        else {
            panic!()
        };
        let seen: Vec<(u64, u8)> = v
            .entries()
            .map(|(gpa, d)| match d {
                PageData::Raw(p) => (gpa, p[0]),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seen, vec![(0, 1), (0x1000, 2)]);
    }
}
