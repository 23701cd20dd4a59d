//! The checkpoint stream's message bodies and their framing: versioned, framed, checksummed.
//!
//! The frame header, the frame kinds and the version live in [`crate::protocol`]; every
//! frame is a [`FrameHeader`], a body and a CRC-32 trailer over both. Control frames
//! (`Hello`, `HelloAck`, `Refuse`, `Ack`, `Heartbeat`, `Bye`) carry one small struct
//! encoded with [`crate::codec`], at most [`MAX_CONTROL_BODY`] bytes. A checkpoint frame's
//! body is laid out so that the sender can send it straight from its staging with
//! vectored writes (the transport's `Channel::send_checkpoint` hands
//! [`CheckpointFrame::chunks`] to the channel's own gather send), and checksum it a slab
//! at a time:
//!
//! ```text
//! epoch u64 | generation u64 | page_count u64 | state_len u64 | disk_len u64 | delta_len u64
//!                                                                           (48 bytes)
//! page index:    page_count × u64: gpa | kind (low 12 bits: 0 raw, 1 zero, 2 delta)
//! raw pages:     4096 bytes per raw page, in index order  \  runs of the slabs'
//! state:         state_len bytes                          /  used parts
//! delta section: delta_len bytes, a record per delta page, in index order
//! disk section:  disk_len bytes
//! ```
//!
//! (Page kinds and delta records: [`crate::encoding`].)
//!
//! The receiver ([`FrameReader`]) checks every length against [`Limits`] derived from the
//! guest's shape *before* it allocates or reads further (page count ≤ guest pages, state
//! length ≤ cap, every index entry of a known kind, page aligned and inside guest memory,
//! body length consistent with the raw pages the index announces), reads the payload into
//! its own [`Staging`] (reusing its slabs), verifies the checksum and the delta records'
//! structure, and only then yields a [`VerifiedCheckpoint`]. A torn or corrupt frame is an
//! error and leaves the staging empty: nothing of it can be applied (I2).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::apply::VerifiedCheckpoint;
use crate::codec::{self, CodecError};
use crate::encoding::{
    DeltaRecords, DeltaSectionError, PageKind, DELTA_HEADER_LEN, KIND_MASK, MAX_DELTA_RECORD,
};
use crate::protocol::{
    FrameHeader, FrameKind, HeaderError, Heartbeat, FRAME_HEADER_LEN, TRAILER_LEN,
};
use crate::slab::{EpochStats, Staging, StagingConfig, PAGE_SIZE};

/// Length of the fixed part of a checkpoint body.
pub const CHECKPOINT_HEADER_LEN: usize = 48;
/// Length of a disk segment's header in a checkpoint's disk section.
pub const DISK_SEGMENT_HEADER_LEN: usize = 16;
/// Largest disk section a checkpoint may carry by default (the writes of one
/// epoch, or a batch of initial-sync blocks).
pub const DEFAULT_DISK_LIMIT: u64 = 1 << 30;
/// Most block hashes in one [`DiskHashes`] message (fits a control frame).
pub const MAX_HASHES_PER_MESSAGE: usize = 1024;
/// Largest control frame body accepted: 64 KiB.
pub const MAX_CONTROL_BODY: u32 = 64 * 1024;
/// Longest guest kernel command line in a handshake.
pub const MAX_CMDLINE_LEN: usize = 4096;
/// Most vCPUs in a handshake.
pub const MAX_VCPUS: u32 = 254;
/// Most NICs in a handshake.
pub const MAX_NICS: usize = 32;
/// Most disks in a handshake.
pub const MAX_DISKS: usize = 32;

/// Which side of the protected VM a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Runs the guest and sends checkpoints.
    Primary,
    /// Receives checkpoints and takes over on failure.
    Standby,
}

/// The guest's devices, as far as the standby must mirror them with its own host resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesSummary {
    /// MAC address of each NIC, in device order.
    pub nic_macs: Vec<[u8; 6]>,
    /// Each disk, in device order.
    pub disks: Vec<DiskShape>,
}

/// A disk of the guest, as its replica must match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskShape {
    /// Size in bytes.
    pub bytes: u64,
    /// Whether the guest may only read it.
    pub readonly: bool,
}

/// How the primary brings the replicas equal to its disks at pairing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DiskSync {
    /// The standby sends its replicas' block hashes; only differing blocks
    /// are sent.
    #[default]
    Hashes,
    /// Every block is sent.
    Full,
}

/// The SHA-256 of consecutive blocks of a replica, from `first` on (the
/// standby's answer to a Hello with [`DiskSync::Hashes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHashes {
    /// The disk.
    pub disk: u32,
    /// Index of the first block.
    pub first: u64,
    /// The hashes.
    pub hashes: Vec<[u8; 32]>,
}

/// The shape of the protected guest, fixed by the primary in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestShape {
    /// Guest memory size in bytes (a positive multiple of 4096).
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest kernel command line.
    pub cmdline: String,
    /// Devices.
    pub devices: DevicesSummary,
}

impl GuestShape {
    /// Checks the shape's fields against sane bounds and the receiver's own memory cap.
    pub fn validate(&self, max_mem_bytes: u64) -> Result<(), WireError> {
        if self.mem_bytes == 0 || self.mem_bytes % PAGE_SIZE as u64 != 0 {
            return Err(WireError::ShapeMemory {
                mem_bytes: self.mem_bytes,
            });
        }
        if self.mem_bytes > max_mem_bytes {
            return Err(WireError::ShapeMemoryTooLarge {
                mem_bytes: self.mem_bytes,
                max: max_mem_bytes,
            });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(WireError::ShapeVcpus { vcpus: self.vcpus });
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(WireError::ShapeCmdline {
                len: self.cmdline.len(),
            });
        }
        if self.devices.nic_macs.len() > MAX_NICS || self.devices.disks.len() > MAX_DISKS {
            return Err(WireError::ShapeDevices {
                nics: self.devices.nic_macs.len(),
                disks: self.devices.disks.len(),
            });
        }
        Ok(())
    }
}

/// Longest epoch a [`EpochPolicy`] may name, in milliseconds (the CLI's
/// bound on `--ft-interval-ms` and `--ft-max-interval-ms`).
pub const MAX_EPOCH_MS: u32 = 60_000;
/// Largest page cache an [`EpochPolicy`] may name (the CLI's bound on
/// `--ft-cache-mib`).
pub const MAX_CACHE_BYTES: u64 = 64 << 30;

/// The primary's epoch settings at pairing. A standby that takes over
/// protects the guest with them when it is paired again (`ctl protect`),
/// so a failover does not change how the guest is checkpointed. The write
/// fault's cost (adaptive mode) is not sent: it belongs to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochPolicy {
    /// Epoch length in milliseconds (adaptive: the shortest, and the first).
    pub interval_ms: u32,
    /// Adaptive epochs: the longest length in milliseconds; 0: fixed epochs.
    pub max_interval_ms: u32,
    /// Adaptive epochs: the overhead budget in parts per million of the
    /// guest's time (0 with fixed epochs).
    pub budget_ppm: u32,
    /// The sender's page cache for deltas, in bytes (0: no deltas).
    pub cache_bytes: u64,
}

impl EpochPolicy {
    /// Checks the fields against the bounds the CLI enforces.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = || WireError::EpochPolicy { policy: *self };
        if !(1..=MAX_EPOCH_MS).contains(&self.interval_ms) || self.cache_bytes > MAX_CACHE_BYTES {
            return Err(bad());
        }
        if self.max_interval_ms != 0
            && (self.max_interval_ms < self.interval_ms
                || self.max_interval_ms > MAX_EPOCH_MS
                || !(1..1_000_000).contains(&self.budget_ppm))
        {
            return Err(bad());
        }
        Ok(())
    }
}

/// Opens a session: the primary's identity and guest shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's wire version.
    pub version: u16,
    /// The protection generation (fences old primaries, I5).
    pub generation: u64,
    /// The sender's role.
    pub role: Role,
    /// Heartbeat interval both sides use, in milliseconds (the peer is lost
    /// after a few intervals of silence).
    pub heartbeat_ms: u32,
    /// The guest's shape.
    pub shape: GuestShape,
    /// How the disks are brought equal at pairing.
    pub disk_sync: DiskSync,
    /// The VM's id on the witness (empty without one).
    pub vm_id: String,
    /// Whether the primary's role changes go through a witness (the
    /// standby must then use the same one).
    pub witnessed: bool,
    /// The primary's epoch settings, kept by a standby that takes over.
    pub epochs: EpochPolicy,
}

/// Accepts a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The receiver's wire version.
    pub version: u16,
    /// The generation accepted.
    pub generation: u64,
}

/// Refuses a [`Hello`] (or ends a session) with a reason for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    /// Why.
    pub reason: String,
}

/// The standby has checkpoint `epoch` of `generation` applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The checkpoint's epoch.
    pub epoch: u64,
    /// Its generation.
    pub generation: u64,
}

/// A control message (every frame kind but checkpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`Refuse`].
    Refuse(Refuse),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Heartbeat`] (sent on the heartbeat connection, as a fixed-size frame).
    Heartbeat(Heartbeat),
    /// See [`DiskHashes`].
    DiskHashes(DiskHashes),
    /// Orderly end of the session.
    Bye,
}

impl Message {
    /// The frame kind carrying this message.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::HelloAck(_) => FrameKind::HelloAck,
            Message::Refuse(_) => FrameKind::Refuse,
            Message::Ack(_) => FrameKind::Ack,
            Message::Heartbeat(_) => FrameKind::Heartbeat,
            Message::DiskHashes(_) => FrameKind::DiskHashes,
            Message::Bye => FrameKind::Bye,
        }
    }
}

/// What a receiver accepts, derived from the guest's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Guest memory in bytes: a checkpoint holds at most `mem_bytes / 4096` pages.
    /// Zero before the handshake: checkpoints are refused.
    pub mem_bytes: u64,
    /// Exclusive end of the guest physical address range pages may have. Equal to
    /// `mem_bytes` for a guest without a memory hole; larger where memory is split around
    /// one (apply checks each page against the real memory map anyway).
    pub gpa_end: u64,
    /// Largest state blob in a checkpoint.
    pub max_state_bytes: u64,
    /// Largest control frame body.
    pub max_control_body: u32,
    /// The guest's disks: disk segments name one of them.
    pub disks: u32,
    /// Largest disk section of a checkpoint.
    pub max_disk_bytes: u64,
}

impl Limits {
    /// Limits before the handshake: control frames only.
    pub const fn handshake() -> Self {
        Limits {
            mem_bytes: 0,
            gpa_end: 0,
            max_state_bytes: 0,
            max_control_body: MAX_CONTROL_BODY,
            disks: 0,
            max_disk_bytes: 0,
        }
    }

    /// Limits for a validated guest `shape` (bounded by the receiver's `max_mem_bytes`),
    /// with a state cap of `max_state_bytes`.
    pub fn for_shape(
        shape: &GuestShape,
        max_mem_bytes: u64,
        max_state_bytes: u64,
    ) -> Result<Self, WireError> {
        shape.validate(max_mem_bytes)?;
        Ok(Limits {
            mem_bytes: shape.mem_bytes,
            gpa_end: shape.mem_bytes,
            max_state_bytes,
            max_control_body: MAX_CONTROL_BODY,
            disks: shape.devices.disks.len() as u32,
            max_disk_bytes: DEFAULT_DISK_LIMIT,
        })
    }

    /// Most pages a checkpoint may hold.
    pub fn guest_pages(&self) -> u64 {
        self.mem_bytes / PAGE_SIZE as u64
    }

    /// A staging configuration able to receive any checkpoint these limits admit.
    pub fn staging_config(&self) -> StagingConfig {
        StagingConfig {
            max_pages: usize::try_from(self.guest_pages()).unwrap_or(usize::MAX),
            max_state_bytes: usize::try_from(self.max_state_bytes).unwrap_or(usize::MAX),
            ..StagingConfig::for_guest(self.mem_bytes)
        }
    }
}

/// Errors of encoding and decoding frames. Each says what was wrong, with the value.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading from the channel failed (not at a clean end of stream).
    #[error("cannot read the {what} from the checkpoint channel: {source}")]
    Io {
        /// The part being read.
        what: &'static str,
        /// The reader's error (a channel's carries the peer's address).
        #[source]
        source: io::Error,
    },
    /// The stream ended cleanly, between frames.
    #[error("the peer closed the stream (between frames)")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a {what} (torn frame)")]
    Truncated {
        /// The part being read.
        what: &'static str,
    },
    /// The frame header is not ours (magic, version, kind); a stream out of
    /// sync shows as a bad magic.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A checkpoint's disk section is over the limit.
    #[error("checkpoint disk section of {len} bytes exceeds the limit of {max} bytes")]
    DiskTooLarge {
        /// Length announced.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A disk segment does not fit the disk section.
    #[error("disk segment at byte {at} of the disk section claims {len} bytes, {left} remain")]
    DiskSegment {
        /// Where.
        at: usize,
        /// Its length.
        len: u64,
        /// What is left.
        left: usize,
    },
    /// A disk segment for a disk the guest does not have.
    #[error("disk segment for disk {disk}, but the guest has {disks} disks")]
    NoSuchDisk {
        /// The index.
        disk: u32,
        /// How many the guest has.
        disks: u32,
    },
    /// A control frame body is over the limit.
    #[error("{kind} frame body of {len} bytes exceeds the limit of {max} bytes")]
    ControlTooLarge {
        /// Frame kind name.
        kind: &'static str,
        /// Declared body length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A checkpoint arrived before the guest's shape was known.
    #[error("checkpoint frame received before the handshake fixed the guest's shape")]
    NoGuestShape,
    /// Too many pages.
    #[error("checkpoint page count {pages} exceeds guest size of {guest_pages} pages")]
    TooManyPages {
        /// Declared page count.
        pages: u64,
        /// Pages in the guest.
        guest_pages: u64,
    },
    /// State too large.
    #[error("checkpoint state length {len} exceeds the cap of {max} bytes")]
    StateTooLarge {
        /// Declared state length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The body length disagrees with the checkpoint header.
    #[error("checkpoint frame body of {body_len} bytes does not match its header ({pages} pages and {state_len} state bytes make {expected} bytes)")]
    BodyLength {
        /// Declared body length.
        body_len: u64,
        /// Declared pages.
        pages: u64,
        /// Declared state length.
        state_len: u64,
        /// What they add up to (with the raw pages the index announces, once it is read).
        expected: u64,
    },
    /// An index entry's low bits name no page kind.
    #[error("checkpoint page {index} has index entry {entry:#x}, whose kind {} is unknown", entry & KIND_MASK)]
    UnknownPageKind {
        /// Position in the page index.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// The delta section cannot hold the delta pages the index announces.
    #[error("checkpoint delta section of {len} bytes cannot hold {deltas} delta records (each {DELTA_HEADER_LEN}..={MAX_DELTA_RECORD} bytes)")]
    DeltaLength {
        /// Declared length.
        len: u64,
        /// Delta pages in the index.
        deltas: u64,
    },
    /// A delta record is malformed.
    #[error("checkpoint delta section: {0}")]
    Delta(#[from] DeltaSectionError),
    /// A page address is outside guest memory.
    #[error(
        "checkpoint page {index} has address {gpa:#x}, outside guest memory ending at {gpa_end:#x}"
    )]
    GpaOutOfRange {
        /// Position in the page index.
        index: u64,
        /// The address.
        gpa: u64,
        /// End of guest memory.
        gpa_end: u64,
    },
    /// The checksum does not match.
    #[error("checksum mismatch in {kind} frame of {body_len} body bytes: computed {computed:#010x}, trailer says {expected:#010x}")]
    Checksum {
        /// Frame kind name.
        kind: &'static str,
        /// Body length.
        body_len: u64,
        /// CRC computed over what arrived.
        computed: u32,
        /// CRC in the trailer.
        expected: u32,
    },
    /// A control body does not decode.
    #[error("malformed {kind} frame body: {source}")]
    Body {
        /// Frame kind name.
        kind: &'static str,
        /// The codec's complaint.
        #[source]
        source: CodecError,
    },
    /// A control body could not be encoded.
    #[error("cannot encode {kind} frame: {source}")]
    Encode {
        /// Frame kind name.
        kind: &'static str,
        /// The codec's complaint.
        #[source]
        source: CodecError,
    },
    /// Guest memory size unusable.
    #[error("guest memory size of {mem_bytes} bytes is not a positive multiple of {PAGE_SIZE}")]
    ShapeMemory {
        /// Size given.
        mem_bytes: u64,
    },
    /// Guest memory larger than this host accepts.
    #[error("guest memory size of {mem_bytes} bytes exceeds this host's limit of {max} bytes")]
    ShapeMemoryTooLarge {
        /// Size given.
        mem_bytes: u64,
        /// The limit.
        max: u64,
    },
    /// vCPU count unusable.
    #[error("guest vCPU count {vcpus} is outside 1..={MAX_VCPUS}")]
    ShapeVcpus {
        /// Count given.
        vcpus: u32,
    },
    /// Command line too long.
    #[error("guest command line of {len} bytes exceeds {MAX_CMDLINE_LEN} bytes")]
    ShapeCmdline {
        /// Length given.
        len: usize,
    },
    /// Too many devices.
    #[error(
        "guest has {nics} NICs and {disks} disks; at most {MAX_NICS} and {MAX_DISKS} are supported"
    )]
    ShapeDevices {
        /// NICs given.
        nics: usize,
        /// Disks given.
        disks: usize,
    },
    /// Epoch settings out of bounds.
    #[error("epoch settings out of bounds: {policy:?} (epochs 1..={MAX_EPOCH_MS} ms, the longest at least the shortest, a budget of 1..1000000 ppm, a cache of at most {MAX_CACHE_BYTES} bytes)")]
    EpochPolicy {
        /// What was given.
        policy: EpochPolicy,
    },
}

/// Encodes `msg` as a complete frame into `out`, replacing its contents and reusing its
/// capacity (no allocation once `out` has grown to the frame's size).
pub fn encode_message(msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let kind = msg.kind();
    out.clear();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    let res = match msg {
        Message::Hello(m) => codec::encode_append(m, out),
        Message::HelloAck(m) => codec::encode_append(m, out),
        Message::Refuse(m) => codec::encode_append(m, out),
        Message::Ack(m) => codec::encode_append(m, out),
        Message::Heartbeat(m) => codec::encode_append(m, out),
        Message::DiskHashes(m) => codec::encode_append(m, out),
        Message::Bye => Ok(()),
    };
    res.map_err(|source| WireError::Encode {
        kind: kind.name(),
        source,
    })?;
    let body_len = (out.len() - FRAME_HEADER_LEN) as u64;
    if body_len > u64::from(MAX_CONTROL_BODY) {
        out.clear();
        return Err(WireError::ControlTooLarge {
            kind: kind.name(),
            len: body_len,
            max: MAX_CONTROL_BODY,
        });
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&FrameHeader { kind, body_len }.encode());
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A staged checkpoint framed for sending: header and trailer bytes (on the stack), the
/// staging's index and slabs in between. The checksum is computed when it is built, a
/// slab at a time; the payload is never copied.
#[derive(Debug, Clone)]
pub struct CheckpointFrame<'a> {
    staging: &'a Staging,
    head: [u8; FRAME_HEADER_LEN + CHECKPOINT_HEADER_LEN],
    disk_heads: [[u8; DISK_SEGMENT_HEADER_LEN]; MAX_DISKS],
    disk_data: [&'a [u8]; MAX_DISKS],
    disk_count: usize,
    trailer: [u8; TRAILER_LEN],
}

impl<'a> CheckpointFrame<'a> {
    /// Frames the checkpoint staged in `staging` as `epoch` of `generation`.
    pub fn new(staging: &'a Staging, epoch: u64, generation: u64) -> Self {
        Self::with_disks(staging, epoch, generation, std::iter::empty())
    }

    /// Frames the checkpoint staged in `staging` as `epoch` of `generation`,
    /// with each disk's records (disk index and bytes; empty ones are left
    /// out) as its disk section, sent from where they lie. At most
    /// [`MAX_DISKS`] disks.
    pub fn with_disks(
        staging: &'a Staging,
        epoch: u64,
        generation: u64,
        disks: impl Iterator<Item = (u32, &'a [u8])>,
    ) -> Self {
        let mut disk_heads = [[0u8; DISK_SEGMENT_HEADER_LEN]; MAX_DISKS];
        let mut disk_data: [&'a [u8]; MAX_DISKS] = [&[]; MAX_DISKS];
        let mut disk_count = 0;
        let mut disk_len = 0u64;
        for (disk, bytes) in disks.filter(|(_, b)| !b.is_empty()).take(MAX_DISKS) {
            let h = &mut disk_heads[disk_count];
            h[0..4].copy_from_slice(&disk.to_le_bytes());
            h[8..16].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            disk_data[disk_count] = bytes;
            disk_count += 1;
            disk_len += (DISK_SEGMENT_HEADER_LEN + bytes.len()) as u64;
        }
        let pages = staging.page_count() as u64;
        let state_len = staging.state_len() as u64;
        let delta_len = staging.delta_bytes().len() as u64;
        let body_len = (CHECKPOINT_HEADER_LEN + staging.index_bytes().len()) as u64
            + staging.wire_payload_len() as u64
            + disk_len;
        let mut head = [0u8; FRAME_HEADER_LEN + CHECKPOINT_HEADER_LEN];
        let header = FrameHeader {
            kind: FrameKind::Checkpoint,
            body_len,
        };
        head[..FRAME_HEADER_LEN].copy_from_slice(&header.encode());
        let c = &mut head[FRAME_HEADER_LEN..];
        c[0..8].copy_from_slice(&epoch.to_le_bytes());
        c[8..16].copy_from_slice(&generation.to_le_bytes());
        c[16..24].copy_from_slice(&pages.to_le_bytes());
        c[24..32].copy_from_slice(&state_len.to_le_bytes());
        c[32..40].copy_from_slice(&disk_len.to_le_bytes());
        c[40..48].copy_from_slice(&delta_len.to_le_bytes());
        let mut frame = CheckpointFrame {
            staging,
            head,
            disk_heads,
            disk_data,
            disk_count,
            trailer: [0; TRAILER_LEN],
        };
        let mut h = crc32fast::Hasher::new();
        for chunk in frame.body_chunks() {
            h.update(chunk);
        }
        frame.trailer = h.finalize().to_le_bytes();
        frame
    }

    /// Everything but the trailer, in order.
    fn body_chunks(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let disks = self.disk_heads[..self.disk_count]
            .iter()
            .zip(&self.disk_data[..self.disk_count])
            .flat_map(|(h, d)| [&h[..], *d]);
        std::iter::once(&self.head[..])
            .chain(std::iter::once(self.staging.index_bytes()))
            .chain(self.staging.payload_chunks())
            .chain(disks)
    }

    /// Total frame length in bytes.
    pub fn len(&self) -> u64 {
        let disks: usize = self.disk_data[..self.disk_count]
            .iter()
            .map(|d| DISK_SEGMENT_HEADER_LEN + d.len())
            .sum();
        (self.head.len()
            + self.staging.index_bytes().len()
            + self.staging.wire_payload_len()
            + disks
            + TRAILER_LEN) as u64
    }

    /// Always false: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The checkpoint's epoch.
    pub fn epoch(&self) -> u64 {
        le_u64(&self.head[FRAME_HEADER_LEN..])
    }

    /// The staging the checkpoint's pages and state are sent from (a transport that
    /// registers memory looks at its [`crate::SlabSet`]).
    pub fn staging(&self) -> &'a Staging {
        self.staging
    }

    /// The checkpoint's generation.
    pub fn generation(&self) -> u64 {
        le_u64(&self.head[FRAME_HEADER_LEN + 8..])
    }

    /// The frame's checksum.
    pub fn crc(&self) -> u32 {
        u32::from_le_bytes(self.trailer)
    }

    /// Frame header and checkpoint header (64 bytes).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The checksum trailer.
    pub fn trailer(&self) -> &[u8] {
        &self.trailer
    }

    /// The frame's parts in order: head, page index, the raw pages and the state (runs of
    /// the slabs' used parts), the delta section, each disk segment's header and records,
    /// trailer. They point into the staging and the disks'
    /// journals: a sender gathers them into its vectored writes (the transport's
    /// `Channel::send_checkpoint`), copying nothing.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.body_chunks().chain(std::iter::once(&self.trailer[..]))
    }

    /// Copies the whole frame into `out` (replacing its contents): for tests and tools.
    pub fn copy_into(&self, out: &mut Vec<u8>) {
        out.clear();
        for c in self.chunks() {
            out.extend_from_slice(c);
        }
    }
}

/// The segments of a disk section: (disk index, its records' bytes).
#[derive(Debug, Clone)]
pub struct DiskSegments<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> DiskSegments<'a> {
    /// The segments of the disk section `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        DiskSegments { bytes, at: 0 }
    }

    fn fail(&mut self, len: u64, left: usize) -> Option<Result<(u32, &'a [u8]), WireError>> {
        let at = self.at;
        self.bytes = &[];
        Some(Err(WireError::DiskSegment { at, len, left }))
    }
}

impl<'a> Iterator for DiskSegments<'a> {
    type Item = Result<(u32, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.bytes;
        if bytes.is_empty() {
            return None;
        }
        let Some(h) = bytes.get(..DISK_SEGMENT_HEADER_LEN) else {
            return self.fail(DISK_SEGMENT_HEADER_LEN as u64, bytes.len());
        };
        let disk = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let len = le_u64(&h[8..]);
        let rest = &bytes[DISK_SEGMENT_HEADER_LEN..];
        if len > rest.len() as u64 {
            return self.fail(len, rest.len());
        }
        let (seg, tail) = rest.split_at(len as usize);
        self.bytes = tail;
        self.at += DISK_SEGMENT_HEADER_LEN + seg.len();
        Some(Ok((disk, seg)))
    }
}

/// A decoded, verified frame.
#[derive(Debug)]
pub enum Frame<'s> {
    /// A control message.
    Message(Message),
    /// A complete checkpoint whose checksum matched, held in the receiver's staging.
    Checkpoint(VerifiedCheckpoint<'s>),
}

/// Reads frames from a stream, validating before allocating and verifying before
/// yielding. Reuses its buffers (and the staging's slabs) from frame to frame.
#[derive(Debug)]
pub struct FrameReader {
    limits: Limits,
    body: Vec<u8>,
    /// Check each frame's CRC trailer (off only where the channel
    /// authenticates every byte, see [`FrameReader::trust_channel`]).
    check_crc: bool,
}

/// A frame's running CRC-32, or nothing where the channel already
/// authenticates every byte.
struct FrameCrc(Option<crc32fast::Hasher>);

impl FrameCrc {
    fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = self.0.as_mut() {
            h.update(bytes);
        }
    }
}

fn read_exact<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated { what }
        } else {
            WireError::Io { what, source: e }
        }
    })
}

/// Reads a frame header; end of stream before its first byte is [`WireError::Closed`].
fn read_header<R: Read + ?Sized>(
    r: &mut R,
    head: &mut [u8; FRAME_HEADER_LEN],
) -> Result<(), WireError> {
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => {
                return Err(WireError::Truncated {
                    what: "frame header",
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(WireError::Io {
                    what: "frame header",
                    source,
                })
            }
        }
    }
    Ok(())
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl FrameReader {
    /// A reader that enforces `limits` ([`Limits::handshake`] until the shape is known).
    pub fn new(limits: Limits) -> Self {
        FrameReader {
            limits,
            body: Vec::new(),
            check_crc: true,
        }
    }

    /// The stream comes from a channel that authenticates every byte (an
    /// AEAD-sealed channel, which rejects any altered, missing or extra
    /// byte before it gets here): skip computing and checking the CRC
    /// trailers, which can only agree. Lengths and limits are still checked.
    pub fn trust_channel(&mut self, authenticated: bool) {
        self.check_crc = !authenticated;
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the limits (after the handshake).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Reads one frame from `r`. A checkpoint is received into `staging` (which must not
    /// be borrowed by an earlier [`VerifiedCheckpoint`]) and yielded only once complete and
    /// verified; on any error the staging is left empty.
    pub fn read_frame<'s, R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        staging: &'s mut Staging,
    ) -> Result<Frame<'s>, WireError> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        read_header(r, &mut head)?;
        let FrameHeader { kind, body_len } = FrameHeader::decode(&head)?;
        let mut hasher = FrameCrc(self.check_crc.then(crc32fast::Hasher::new));
        hasher.update(&head);

        if kind == FrameKind::Checkpoint {
            return match self.read_checkpoint(r, staging, body_len, hasher) {
                Ok((epoch, generation, stats)) => {
                    let staging: &'s Staging = staging;
                    Ok(Frame::Checkpoint(VerifiedCheckpoint::new(
                        staging, epoch, generation, stats,
                    )))
                }
                Err(e) => {
                    staging.recv_abort();
                    Err(e)
                }
            };
        }

        if body_len > u64::from(self.limits.max_control_body) {
            return Err(WireError::ControlTooLarge {
                kind: kind.name(),
                len: body_len,
                max: self.limits.max_control_body,
            });
        }
        self.body.resize(body_len as usize, 0);
        read_exact(r, &mut self.body, "control frame body")?;
        hasher.update(&self.body);
        check_trailer(r, hasher, kind, body_len)?;
        let limit = u64::from(self.limits.max_control_body);
        let body = &self.body[..];
        let bad = |source| WireError::Body {
            kind: kind.name(),
            source,
        };
        let msg = match kind {
            FrameKind::Hello => Message::Hello(codec::decode_state(body, limit).map_err(bad)?),
            FrameKind::HelloAck => {
                Message::HelloAck(codec::decode_state(body, limit).map_err(bad)?)
            }
            FrameKind::Refuse => Message::Refuse(codec::decode_state(body, limit).map_err(bad)?),
            FrameKind::Ack => Message::Ack(codec::decode_state(body, limit).map_err(bad)?),
            FrameKind::Heartbeat => {
                Message::Heartbeat(codec::decode_state(body, limit).map_err(bad)?)
            }
            FrameKind::DiskHashes => {
                Message::DiskHashes(codec::decode_state(body, limit).map_err(bad)?)
            }
            FrameKind::Bye => {
                codec::decode_state::<()>(body, limit).map_err(bad)?;
                Message::Bye
            }
            FrameKind::Checkpoint => unreachable!("handled above"),
        };
        Ok(Frame::Message(msg))
    }

    fn read_checkpoint<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        staging: &mut Staging,
        body_len: u64,
        mut hasher: FrameCrc,
    ) -> Result<(u64, u64, EpochStats), WireError> {
        let lim = self.limits;
        if lim.mem_bytes == 0 {
            return Err(WireError::NoGuestShape);
        }
        if body_len < CHECKPOINT_HEADER_LEN as u64 {
            return Err(WireError::BodyLength {
                body_len,
                pages: 0,
                state_len: 0,
                expected: CHECKPOINT_HEADER_LEN as u64,
            });
        }
        let mut ch = [0u8; CHECKPOINT_HEADER_LEN];
        read_exact(r, &mut ch, "checkpoint header")?;
        hasher.update(&ch);
        let epoch = le_u64(&ch[0..]);
        let generation = le_u64(&ch[8..]);
        let pages = le_u64(&ch[16..]);
        let state_len = le_u64(&ch[24..]);
        let disk_len = le_u64(&ch[32..]);
        let delta_len = le_u64(&ch[40..]);
        // Every length is checked before anything is allocated or read.
        if disk_len > lim.max_disk_bytes {
            return Err(WireError::DiskTooLarge {
                len: disk_len,
                max: lim.max_disk_bytes,
            });
        }
        let guest_pages = lim.guest_pages().min(staging.config().max_pages as u64);
        if pages > guest_pages {
            return Err(WireError::TooManyPages { pages, guest_pages });
        }
        let max_state = lim
            .max_state_bytes
            .min(staging.config().max_state_bytes as u64);
        if state_len > max_state {
            return Err(WireError::StateTooLarge {
                len: state_len,
                max: max_state,
            });
        }
        if delta_len > pages * MAX_DELTA_RECORD as u64 {
            return Err(WireError::DeltaLength {
                len: delta_len,
                deltas: pages,
            });
        }
        // No overflow: pages ≤ 2^52, state_len ≤ usize::MAX, the others bounded above.
        let body_len_for = |raw: u64| {
            CHECKPOINT_HEADER_LEN as u64
                + pages * 8
                + raw * PAGE_SIZE as u64
                + state_len
                + delta_len
                + disk_len
        };
        // Before the index: the body must hold at least the index and the sections.
        if body_len < body_len_for(0) || body_len > body_len_for(pages) {
            return Err(WireError::BodyLength {
                body_len,
                pages,
                state_len,
                expected: body_len_for(pages),
            });
        }

        let index = staging.recv_begin(pages as usize);
        read_exact(r, index, "checkpoint page index")?;
        hasher.update(index);
        let (mut raw, mut deltas) = (0u64, 0u64);
        for i in 0..pages as usize {
            let entry = staging.entry_at(i);
            let gpa = entry & !KIND_MASK;
            match PageKind::of_entry(entry) {
                Some(PageKind::Raw) => raw += 1,
                Some(PageKind::Delta) => deltas += 1,
                Some(PageKind::Zero) => {}
                None => {
                    return Err(WireError::UnknownPageKind {
                        index: i as u64,
                        entry,
                    })
                }
            }
            if gpa >= lim.gpa_end || lim.gpa_end - gpa < PAGE_SIZE as u64 {
                return Err(WireError::GpaOutOfRange {
                    index: i as u64,
                    gpa,
                    gpa_end: lim.gpa_end,
                });
            }
        }
        if delta_len < deltas * DELTA_HEADER_LEN as u64
            || delta_len > deltas * MAX_DELTA_RECORD as u64
        {
            return Err(WireError::DeltaLength {
                len: delta_len,
                deltas,
            });
        }
        if body_len != body_len_for(raw) {
            return Err(WireError::BodyLength {
                body_len,
                pages,
                state_len,
                expected: body_len_for(raw),
            });
        }
        staging.recv_payload(raw as usize, state_len as usize, |chunk| {
            read_exact(r, chunk, "checkpoint payload")?;
            hasher.update(chunk);
            Ok::<(), WireError>(())
        })?;
        staging.recv_delta(delta_len as usize, |piece| {
            read_exact(r, piece, "checkpoint delta section")?;
            hasher.update(piece);
            Ok::<(), WireError>(())
        })?;
        let disk = staging.recv_disk(disk_len as usize);
        read_exact(r, disk, "checkpoint disk section")?;
        hasher.update(disk);
        check_trailer(r, hasher, FrameKind::Checkpoint, body_len)?;
        DeltaRecords::check(staging.delta_bytes(), deltas as usize)?;
        for seg in DiskSegments::new(staging.disk_bytes()) {
            let (disk, _) = seg?;
            if disk >= lim.disks {
                return Err(WireError::NoSuchDisk {
                    disk,
                    disks: lim.disks,
                });
            }
        }
        Ok((epoch, generation, staging.recv_finish()))
    }
}

fn check_trailer<R: Read + ?Sized>(
    r: &mut R,
    hasher: FrameCrc,
    kind: FrameKind,
    body_len: u64,
) -> Result<(), WireError> {
    let mut t = [0u8; TRAILER_LEN];
    read_exact(r, &mut t, "frame trailer")?;
    let expected = u32::from_le_bytes(t);
    let Some(hasher) = hasher.0 else {
        return Ok(());
    };
    let computed = hasher.finalize();
    if computed != expected {
        return Err(WireError::Checksum {
            kind: kind.name(),
            body_len,
            computed,
            expected,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::Page;
    use crate::WIRE_VERSION;

    pub(crate) fn shape(mem_bytes: u64) -> GuestShape {
        GuestShape {
            mem_bytes,
            vcpus: 2,
            cmdline: "console=ttyS0 ftguest.pages=64".into(),
            devices: DevicesSummary {
                nic_macs: vec![[0x02, 0, 0, 0, 0, 1]],
                disks: vec![DiskShape {
                    bytes: 8 << 20,
                    readonly: false,
                }],
            },
        }
    }

    fn limits(mem_bytes: u64) -> Limits {
        Limits::for_shape(&shape(mem_bytes), 1 << 40, 1 << 20).unwrap()
    }

    fn page(tag: u8) -> Page {
        let mut p = [tag; PAGE_SIZE];
        p[0] = !tag;
        p
    }

    fn staged(pages: &[u64], state: &[u8]) -> Staging {
        let mut st = Staging::new(StagingConfig {
            slab_bytes: 2 * PAGE_SIZE,
            ..limits(64 * 4096).staging_config()
        })
        .unwrap();
        let mut w = st.begin_epoch();
        for &gpa in pages {
            w.stage_page(gpa, &page(gpa as u8 ^ (gpa >> 12) as u8))
                .unwrap();
        }
        w.stage_state(state).unwrap();
        w.finish();
        st
    }

    fn receiver(mem_bytes: u64) -> (FrameReader, Staging) {
        let l = limits(mem_bytes);
        (
            FrameReader::new(l),
            Staging::new(l.staging_config()).unwrap(),
        )
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: WIRE_VERSION,
                generation: 3,
                role: Role::Primary,
                heartbeat_ms: 50,
                shape: shape(1 << 30),
                disk_sync: DiskSync::Hashes,
                vm_id: "vm-1".into(),
                witnessed: true,
                epochs: EpochPolicy {
                    interval_ms: 20,
                    max_interval_ms: 160,
                    budget_ppm: 100_000,
                    cache_bytes: 64 << 20,
                },
            }),
            Message::DiskHashes(DiskHashes {
                disk: 0,
                first: 2,
                hashes: vec![[7; 32], [9; 32]],
            }),
            Message::HelloAck(HelloAck {
                version: WIRE_VERSION,
                generation: 3,
            }),
            Message::Refuse(Refuse {
                reason: "guest memory size of 1 bytes is not a positive multiple of 4096".into(),
            }),
            Message::Ack(Ack {
                epoch: 99,
                generation: 3,
            }),
            Message::Heartbeat(Heartbeat {
                generation: 3,
                epoch: 98,
                seq: 12,
            }),
            Message::Bye,
        ]
    }

    #[test]
    fn control_messages_roundtrip_in_one_stream() {
        let mut stream = Vec::new();
        let mut buf = Vec::new();
        for m in all_messages() {
            encode_message(&m, &mut buf).unwrap();
            stream.extend_from_slice(&buf);
        }
        let mut r = &stream[..];
        let mut fr = FrameReader::new(Limits::handshake());
        let mut st = Staging::new(StagingConfig::for_guest(4096)).unwrap();
        for m in all_messages() {
            match fr.read_frame(&mut r, &mut st).unwrap() {
                Frame::Message(got) => assert_eq!(got, m),
                Frame::Checkpoint(_) => panic!("unexpected checkpoint"),
            }
        }
        assert!(matches!(
            fr.read_frame(&mut r, &mut st),
            Err(WireError::Closed)
        ));
        let mut torn = &buf[..5];
        assert!(matches!(
            fr.read_frame(&mut torn, &mut st),
            Err(WireError::Truncated {
                what: "frame header"
            })
        ));
    }

    #[test]
    fn heartbeat_frames_agree_with_the_message_encoder() {
        let hb = Heartbeat {
            generation: 9,
            epoch: 1 << 40,
            seq: 77,
        };
        let mut buf = Vec::new();
        encode_message(&Message::Heartbeat(hb), &mut buf).unwrap();
        assert_eq!(buf, hb.encode_frame());
        let mut st = Staging::new(StagingConfig::for_guest(4096)).unwrap();
        let got = FrameReader::new(Limits::handshake())
            .read_frame(&mut &hb.encode_frame()[..], &mut st)
            .unwrap();
        assert!(matches!(got, Frame::Message(Message::Heartbeat(h)) if h == hb));
    }

    #[test]
    fn checkpoint_roundtrip() {
        let gpas = [0u64, 0x3000, 0x1000, 63 * 4096, 0x20000];
        let state: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let st = staged(&gpas, &state);
        let frame = CheckpointFrame::new(&st, 7, 2);
        assert_eq!((frame.epoch(), frame.generation()), (7, 2));
        // The chunks a channel gathers: head, index, one per slab, trailer.
        let chunks: Vec<&[u8]> = frame.chunks().collect();
        assert_eq!(chunks.len(), 2 + st.slab_chunks().count() + 1);
        let wire = chunks.concat();
        assert_eq!(wire.len() as u64, frame.len());
        let mut copy = Vec::new();
        frame.copy_into(&mut copy);
        assert_eq!(copy, wire);
        assert_eq!(
            frame.len(),
            (FRAME_HEADER_LEN + CHECKPOINT_HEADER_LEN + 5 * (8 + 4096) + 5000 + TRAILER_LEN) as u64
        );

        let (mut fr, mut rst) = receiver(64 * 4096);
        let Frame::Checkpoint(v) = fr.read_frame(&mut &wire[..], &mut rst).unwrap() else {
            panic!("expected a checkpoint");
        };
        assert_eq!(
            (v.epoch(), v.generation(), v.page_count(), v.state_len()),
            (7, 2, 5, 5000)
        );
        let got: Vec<(u64, Page)> = v.pages().map(|(g, p)| (g, *p)).collect();
        let want: Vec<(u64, Page)> = st.pages().map(|(g, p)| (g, *p)).collect();
        assert_eq!(got, want);
        let mut s = Vec::new();
        v.copy_state_into(&mut s);
        assert_eq!(s, state);
    }

    fn encoded_checkpoint(pages: &[u64], state: &[u8]) -> Vec<u8> {
        let st = staged(pages, state);
        let mut v = Vec::new();
        CheckpointFrame::new(&st, 1, 1).copy_into(&mut v);
        v
    }

    /// Rewrites the checkpoint header fields and fixes the checksum, so that only the
    /// validation under test can object.
    fn forge(frame: &mut [u8], field: usize, value: u64) {
        let at = FRAME_HEADER_LEN + 8 * field;
        frame[at..at + 8].copy_from_slice(&value.to_le_bytes());
        let n = frame.len() - TRAILER_LEN;
        let crc = crc32fast::hash(&frame[..n]);
        frame[n..].copy_from_slice(&crc.to_le_bytes());
    }

    fn read_err(frame: &[u8], mem_bytes: u64) -> (WireError, Staging) {
        let (mut fr, mut st) = receiver(mem_bytes);
        let e = fr.read_frame(&mut &frame[..], &mut st).unwrap_err();
        (e, st)
    }

    #[test]
    fn limits_checked_before_allocation_with_clear_messages() {
        let good = encoded_checkpoint(&[0x1000], b"st");

        let mut f = good.clone();
        forge(&mut f, 2, 9_999_999);
        let (e, st) = read_err(&f, 128 << 20);
        assert_eq!(
            e.to_string(),
            "checkpoint page count 9999999 exceeds guest size of 32768 pages"
        );
        assert_eq!(st.slab_count(), 1, "nothing allocated");

        let mut f = good.clone();
        forge(&mut f, 3, 1 << 40);
        let (e, _) = read_err(&f, 64 * 4096);
        assert_eq!(
            e.to_string(),
            "checkpoint state length 1099511627776 exceeds the cap of 1048576 bytes"
        );

        let mut f = good.clone();
        forge(&mut f, 3, 5000);
        let (e, _) = read_err(&f, 64 * 4096);
        assert!(
            matches!(
                e,
                WireError::BodyLength {
                    pages: 1,
                    state_len: 5000,
                    ..
                }
            ),
            "{e}"
        );

        // One more page than sent: the page's first bytes read as an index entry of no
        // known kind.
        let mut f = good.clone();
        forge(&mut f, 2, 2);
        let (e, st) = read_err(&f, 64 * 4096);
        assert!(
            matches!(e, WireError::UnknownPageKind { index: 1, .. }),
            "{e}"
        );
        assert_eq!(st.page_count(), 0, "staging left empty");

        // A delta section the index has no delta page for.
        let mut f = good.clone();
        forge(&mut f, 5, 6);
        let (e, _) = read_err(&f, 64 * 4096);
        assert!(
            matches!(e, WireError::DeltaLength { len: 6, deltas: 0 }),
            "{e}"
        );

        // The first index entry follows the 48-byte header (field 6).
        let mut f = good.clone();
        forge(&mut f, 6, 64 * 4096);
        let (e, st) = read_err(&f, 64 * 4096);
        assert_eq!(
            e.to_string(),
            "checkpoint page 0 has address 0x40000, outside guest memory ending at 0x40000"
        );
        assert_eq!(st.page_count(), 0, "staging left empty");

        let mut f = good.clone();
        forge(&mut f, 6, 0x1234);
        let (e, _) = read_err(&f, 64 * 4096);
        assert_eq!(
            e.to_string(),
            "checkpoint page 0 has index entry 0x1234, whose kind 564 is unknown"
        );

        let (mut fr, mut st) = (
            FrameReader::new(Limits::handshake()),
            Staging::new(StagingConfig::for_guest(4096)).unwrap(),
        );
        let e = fr.read_frame(&mut &good[..], &mut st).unwrap_err();
        assert!(matches!(e, WireError::NoGuestShape), "{e}");
    }

    #[test]
    fn a_trusted_channel_skips_only_the_crc() {
        let good = encoded_checkpoint(&[0, 0x1000], b"state");
        let mut f = good.clone();
        let n = f.len();
        f[n - 1] ^= 0xff; // the trailer only: the body is intact
        let mut fr =
            FrameReader::new(Limits::for_shape(&shape(64 * 4096), u64::MAX, 1 << 20).unwrap());
        let mut st = Staging::new(fr.limits().staging_config()).unwrap();
        assert!(matches!(
            fr.read_frame(&mut &f[..], &mut st),
            Err(WireError::Checksum { .. })
        ));
        fr.trust_channel(true);
        match fr.read_frame(&mut &f[..], &mut st).unwrap() {
            Frame::Checkpoint(cp) => assert_eq!(cp.page_count(), 2),
            Frame::Message(m) => panic!("{m:?}"),
        }
        // Lengths are still checked: a cut frame is still refused.
        assert!(fr
            .read_frame(&mut &good[..good.len() - 100], &mut st)
            .is_err());
    }

    #[test]
    fn corrupt_or_torn_checkpoint_leaves_nothing() {
        let good = encoded_checkpoint(&[0, 0x1000, 0x2000], b"the vm state");
        // Flip one payload bit.
        let mut f = good.clone();
        let at = FRAME_HEADER_LEN + CHECKPOINT_HEADER_LEN + 3 * 8 + 5000;
        f[at] ^= 0x10;
        let (e, st) = read_err(&f, 64 * 4096);
        assert!(
            matches!(
                e,
                WireError::Checksum {
                    kind: "Checkpoint",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!((st.page_count(), st.state_len()), (0, 0));
        // Cut in the payload.
        let (e, st) = read_err(&good[..good.len() - 100], 64 * 4096);
        assert!(
            matches!(
                e,
                WireError::Truncated {
                    what: "checkpoint payload"
                }
            ),
            "{e}"
        );
        assert_eq!(st.page_count(), 0);
        // Cut in the trailer.
        let (e, _) = read_err(&good[..good.len() - 1], 64 * 4096);
        assert!(
            matches!(
                e,
                WireError::Truncated {
                    what: "frame trailer"
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn header_errors() {
        let mut buf = Vec::new();
        encode_message(&Message::Bye, &mut buf).unwrap();
        let (mut fr, mut st) = receiver(4096);
        let mut f = buf.clone();
        f[0] = b'X';
        assert!(matches!(
            fr.read_frame(&mut &f[..], &mut st),
            Err(WireError::Header(HeaderError::BadMagic { .. }))
        ));
        let mut f = buf.clone();
        f[4] = 99;
        let e = fr.read_frame(&mut &f[..], &mut st).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("unsupported wire version 99 (this build speaks version {WIRE_VERSION})")
        );
        let mut f = buf.clone();
        f[6] = 77;
        assert!(matches!(
            fr.read_frame(&mut &f[..], &mut st),
            Err(WireError::Header(HeaderError::UnknownKind(77)))
        ));
        let mut f = buf.clone();
        f[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = fr.read_frame(&mut &f[..], &mut st).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bye frame body of 1099511627776 bytes exceeds the limit of 65536 bytes"
        );
    }

    #[test]
    fn shape_validation() {
        let ok = shape(1 << 30);
        assert!(Limits::for_shape(&ok, 1 << 30, 1 << 20).is_ok());
        let e = Limits::for_shape(&ok, 1 << 29, 1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest memory size of 1073741824 bytes exceeds this host's limit of 536870912 bytes"
        );
        let e = Limits::for_shape(
            &GuestShape {
                mem_bytes: 4097,
                ..ok.clone()
            },
            1 << 40,
            0,
        )
        .unwrap_err();
        assert!(matches!(e, WireError::ShapeMemory { mem_bytes: 4097 }));
        let e = Limits::for_shape(
            &GuestShape {
                vcpus: 0,
                ..ok.clone()
            },
            1 << 40,
            0,
        )
        .unwrap_err();
        assert!(matches!(e, WireError::ShapeVcpus { vcpus: 0 }));
        let e = Limits::for_shape(
            &GuestShape {
                cmdline: "x".repeat(5000),
                ..ok.clone()
            },
            1 << 40,
            0,
        )
        .unwrap_err();
        assert!(matches!(e, WireError::ShapeCmdline { len: 5000 }));
    }

    #[test]
    fn oversize_control_message_is_refused_by_encoder() {
        let m = Message::Refuse(Refuse {
            reason: "x".repeat(70_000),
        });
        let mut buf = Vec::new();
        assert!(matches!(
            encode_message(&m, &mut buf),
            Err(WireError::ControlTooLarge { .. })
        ));
    }

    #[test]
    fn disk_section_round_trips_and_hostile_sections_are_refused() {
        let st = staged(&[0x1000], b"state");
        let (a, b) = (vec![1u8; 100], vec![2u8; 7]);
        let mut f = Vec::new();
        CheckpointFrame::with_disks(
            &st,
            4,
            1,
            [(0, &a[..]), (0, &[][..]), (0, &b[..])].into_iter(),
        )
        .copy_into(&mut f);
        let (mut fr, mut rx) = receiver(64 * 4096);
        let Frame::Checkpoint(cp) = fr.read_frame(&mut &f[..], &mut rx).unwrap() else {
            panic!("not a checkpoint")
        };
        let segs: Vec<_> = cp.disk_segments().collect();
        assert_eq!(
            segs,
            [(0, &a[..]), (0, &b[..])],
            "empty segments are left out"
        );

        // A segment for a disk the guest does not have (it has one).
        let mut f = Vec::new();
        CheckpointFrame::with_disks(&st, 5, 1, std::iter::once((1, &a[..]))).copy_into(&mut f);
        let (e, rx) = read_err(&f, 64 * 4096);
        assert!(
            matches!(e, WireError::NoSuchDisk { disk: 1, disks: 1 }),
            "{e}"
        );
        assert_eq!(rx.page_count(), 0, "nothing of it is kept");

        // A segment claiming more than the section holds (checksum fixed).
        let mut f = Vec::new();
        CheckpointFrame::with_disks(&st, 6, 1, [(0, &a[..]), (0, &b[..])].into_iter())
            .copy_into(&mut f);
        let second = f.len() - TRAILER_LEN - b.len() - DISK_SEGMENT_HEADER_LEN;
        f[second + 8..second + 16].copy_from_slice(&1000u64.to_le_bytes());
        let n = f.len() - TRAILER_LEN;
        let crc = crc32fast::hash(&f[..n]);
        f[n..].copy_from_slice(&crc.to_le_bytes());
        let (e, _) = read_err(&f, 64 * 4096);
        assert!(
            matches!(
                e,
                WireError::DiskSegment {
                    at: 116,
                    len: 1000,
                    left: 7
                }
            ),
            "{e}"
        );

        // A disk section announced past the limit: refused before reading.
        let mut f = Vec::new();
        CheckpointFrame::new(&st, 7, 1).copy_into(&mut f);
        forge(&mut f, 4, DEFAULT_DISK_LIMIT + 1);
        let (e, _) = read_err(&f, 64 * 4096);
        assert!(matches!(e, WireError::DiskTooLarge { .. }), "{e}");
    }

    #[test]
    fn receiver_slabs_are_reused() {
        let (mut fr, mut st) = receiver(64 * 4096);
        let big = encoded_checkpoint(&(0..10).map(|i| i * 4096).collect::<Vec<_>>(), b"s");
        let small = encoded_checkpoint(&[0], b"s");
        assert!(fr.read_frame(&mut &big[..], &mut st).is_ok());
        let cached = st.slab_count();
        for _ in 0..3 {
            assert!(fr.read_frame(&mut &small[..], &mut st).is_ok());
            assert_eq!(st.slab_count(), cached);
        }
    }
}
