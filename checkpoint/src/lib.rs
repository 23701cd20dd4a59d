//! The ftvmm checkpoint model: a leaf crate, like Cloud Hypervisor's `vm-migration`.
//!
//! It knows nothing of KVM process control. The `vmm` crate implements its traits and
//! drives it, once per epoch (DESIGN.md "The epoch"):
//!
//! 1. pause the vCPUs and quiesce the devices (I4);
//! 2. harvest the dirty pages of every memory region with a [`dirty::HarvestBuffer`]:
//!    KVM's dirty log OR'd with vm-memory's `AtomicBitmap` (I3);
//! 3. copy the dirty pages and the encoded VM state ([`codec::encode_state`]) into
//!    [`slab::Staging`] through an [`slab::EpochWriter`];
//! 4. resume, then encode the staged pages with [`encoding::Encoder`] (zero pages as a
//!    flag, recently sent pages as deltas against the standby's copy) and stream the
//!    slabs: [`wire::CheckpointFrame`] frames them (checksummed incrementally) and hands
//!    [`wire::CheckpointFrame::chunks`], slices straight into the slabs and the delta
//!    section, to the transport's `Channel::send_checkpoint`;
//! 5. the standby reads it with [`wire::FrameReader`], which validates every length
//!    against the guest's shape before allocating and verifies the checksum before it
//!    yields an [`apply::VerifiedCheckpoint`], the only thing that can be applied (I2);
//!    applying checks every delta's base against the CRC it was made against first;
//! 6. both sides account the epoch in [`metrics::EpochMetrics`] and [`metrics::Summary`].
//!
//! [`protocol`] is the one home of the magic, the version, the frame kinds, the connection
//! preamble, the heartbeat frame and the fencing rule ([`protocol::EpochFence`], I5).
//!
//! The hot paths (staging a page, iterating dirty pages) neither allocate, log nor make
//! system calls.
//!
//! # One epoch, both sides
//!
//! ```
//! use ftvmm_checkpoint::wire::{encode_message, Ack, Frame, FrameReader, Message};
//! use ftvmm_checkpoint::{
//!     encode_state, CheckpointFrame, DevicesSummary, GuestShape, HarvestBuffer, Limits,
//!     PageBitmap, Staging, PAGE_SIZE,
//! };
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};
//!
//! const MEM: usize = 1 << 20;
//! let shape = GuestShape { mem_bytes: MEM as u64, vcpus: 1, cmdline: String::new(),
//!                          devices: DevicesSummary::default() };
//! // Primary. `PageBitmap` (or vm-memory's `AtomicBitmap`) records the VMM's own writes.
//! let mem: GuestMemoryMmap<PageBitmap> =
//!     GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
//! mem.write_obj(42u64, GuestAddress(0x3000)).unwrap(); // a device write
//! let kvm_log = vec![1u64 << 5; MEM / PAGE_SIZE / 64]; // vCPUs wrote page 5 (and 69, ...)
//! let limits = Limits::for_shape(&shape, MEM as u64, 1 << 20).unwrap();
//! let mut harvest = HarvestBuffer::new(MEM / PAGE_SIZE);
//! let mut staging = Staging::new(limits.staging_config()).unwrap();
//! let mut state = Vec::new();
//!
//! // ...vCPUs paused, devices quiescent...
//! let region = mem.find_region(GuestAddress(0)).unwrap();
//! let mmap: &MmapRegion<PageBitmap> = region;
//! let counts = harvest.harvest(&kvm_log, mmap.bitmap()).unwrap();
//! encode_state(&("vcpu regs", [0u64; 4]), &mut state).unwrap();
//! let mut w = staging.begin_epoch();
//! for page in harvest.pages() {
//!     let gpa = region.start_addr().0 + (page * PAGE_SIZE) as u64;
//!     mem.read_slice(w.page_slot(gpa).unwrap(), GuestAddress(gpa)).unwrap();
//! }
//! w.stage_state(&state).unwrap();
//! let stats = w.finish();
//! // ...resume; then stream while the guest runs:
//! let mut wire = Vec::new(); // `channel.send_checkpoint(&frame)` in real life
//! CheckpointFrame::new(&staging, 1, 1).copy_into(&mut wire);
//! assert_eq!(stats.pages as u64, counts.total());
//!
//! // Standby.
//! let standby_mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
//! let mut rx = Staging::new(limits.staging_config()).unwrap();
//! let mut reader = FrameReader::new(limits);
//! let mut state_out = Vec::new();
//! let mut ack = Vec::new();
//! match reader.read_frame(&mut &wire[..], &mut rx).unwrap() {
//!     Frame::Checkpoint(ckpt) => {
//!         ckpt.apply(&standby_mem, &mut state_out).unwrap();
//!         encode_message(&Message::Ack(Ack { epoch: ckpt.epoch(), generation: 1 }), &mut ack).unwrap();
//!     }
//!     Frame::Message(m) => panic!("unexpected {m:?}"),
//! }
//! assert_eq!(standby_mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 42);
//! assert_eq!(state_out, state);
//! ```

#![deny(missing_docs)]

pub mod apply;
pub mod codec;
pub mod dirty;
pub mod encoding;
pub mod metrics;
pub mod persist;
pub mod protocol;
pub mod slab;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod wire;

pub use apply::{ApplyError, VerifiedCheckpoint};
pub use codec::{decode_state, encode_state, CodecError, DEFAULT_STATE_LIMIT};
pub use dirty::{DirtyBitmap, DirtyCounts, DirtyError, DirtyPages, HarvestBuffer, PageBitmap};
pub use encoding::{EncodeStats, Encoder, PageData, PageKind, DEFAULT_CACHE_BYTES};
pub use metrics::{EpochMetrics, FieldSummary, Histogram, Summary, SummaryReport};
pub use persist::Persist;
pub use protocol::{EpochFence, FenceError, WIRE_VERSION};
pub use slab::{EpochStats, EpochWriter, SlabSet, Staging, StagingConfig, StagingError, PAGE_SIZE};
pub use wire::{
    CheckpointFrame, DevicesSummary, DiskHashes, DiskShape, DiskSync, EpochPolicy, Frame,
    FrameReader, GuestShape, Hello, Limits, Message, Role, WireError,
};
