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
//! 4. resume, then stream the slabs with [`wire::CheckpointFrame::write_to`] (vectored
//!    writes straight from the slabs, checksummed incrementally);
//! 5. the standby reads it with [`wire::FrameReader`], which validates every length
//!    against the guest's shape before allocating and verifies the checksum before it
//!    yields an [`apply::VerifiedCheckpoint`], the only thing that can be applied (I2);
//! 6. both sides account the epoch in [`metrics::EpochMetrics`] and [`metrics::Summary`].
//!
//! The hot paths (staging a page, iterating dirty pages) neither allocate, log nor make
//! system calls.

#![deny(missing_docs)]

pub mod apply;
pub mod codec;
pub mod dirty;
pub mod metrics;
pub mod persist;
pub mod slab;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod wire;

pub use apply::{ApplyError, EpochFence, FenceError, VerifiedCheckpoint};
pub use codec::{decode_state, encode_state, CodecError, DEFAULT_STATE_LIMIT};
pub use dirty::{DirtyBitmap, DirtyCounts, DirtyError, DirtyPages, HarvestBuffer, PageBitmap};
pub use metrics::{EpochMetrics, FieldSummary, Histogram, Summary, SummaryReport};
pub use persist::Persist;
pub use slab::{EpochStats, EpochWriter, Staging, StagingConfig, StagingError, PAGE_SIZE};
pub use wire::{
    CheckpointFrame, DevicesSummary, Frame, FrameReader, GuestShape, Hello, Limits, Message, Role,
    WireError, WIRE_VERSION,
};
