//! Disk replication (docs/design.md "Disk").
//!
//! - Primary: [`DiskJournals`] starts every disk's [`Journal`] at pairing,
//!   seals the epoch's records at the cut (a swap: nothing is copied in the
//!   pause), hands them to the checkpoint frame, and recycles them once sent.
//! - Standby: [`Replicas`] applies a verified checkpoint's records to the
//!   replica files, in order, and makes them durable when the epoch held a
//!   guest flush, before the ack.
//! - Initial sync: both sides hash their disk in [`SYNC_BLOCK`]s
//!   ([`block_hashes`]); the primary sends the blocks that differ
//!   ([`differing_blocks`]), or all of them (`--ft-disk-sync full`). Writes
//!   the guest makes meanwhile are in epoch 1's journal, replayed after.

use std::sync::Arc;

use std::time::{Duration, Instant};

use ftvmm_devices::virtio::block::journal::{records, write_record, JournalError, Record};
use ftvmm_devices::virtio::block::{Disk, Journal, JournalCounts, JournalEpoch, SECTOR_SIZE};

use crate::vm::Vm;

/// Bytes per block of the initial sync's hash comparison.
pub const SYNC_BLOCK: u64 = 1 << 20;
/// Length of a block hash (SHA-256).
pub const HASH_LEN: usize = 32;

/// Errors of disk replication.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Reading a disk.
    #[error("cannot read disk '{path}' at byte {offset}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing a replica.
    #[error("cannot write replica '{path}' at byte {offset}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// Making a replica durable.
    #[error("cannot flush replica '{path}': {source}")]
    Flush {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A second handle on a disk.
    #[error("cannot open a second handle on disk '{path}': {source}")]
    Clone {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Records for a disk the guest does not have.
    #[error("records for disk {disk}, but the guest has {disks}")]
    NoSuchDisk {
        /// The index.
        disk: u32,
        /// How many there are.
        disks: usize,
    },
    /// A write past the end of a replica (a hostile or corrupt stream).
    #[error(
        "a write of {len} bytes at byte {offset} passes the end of replica '{path}' ({size} bytes)"
    )]
    OutOfRange {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The replica's size.
        size: u64,
    },
    /// The records do not parse.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

fn path_of(d: &Disk) -> String {
    d.path().display().to_string()
}

/// Size of a disk in bytes.
pub fn size_of(d: &Disk) -> u64 {
    d.capacity() * SECTOR_SIZE
}

/// Second handles on every disk of `vm`, in `--disk` order.
pub fn clone_disks(vm: &Vm) -> Result<Vec<Disk>, DiskError> {
    vm.devices
        .blk()
        .iter()
        .map(|b| {
            b.with_device(|d| {
                d.disk().try_clone().map_err(|source| DiskError::Clone {
                    path: path_of(d.disk()),
                    source,
                })
            })
        })
        .collect()
}

/// Reads `disk` block by block, handing each to `f` with its byte offset.
fn for_each_block(disk: &Disk, block: u64, mut f: impl FnMut(u64, &[u8])) -> Result<(), DiskError> {
    let size = size_of(disk);
    let mut buf = vec![0u8; block as usize];
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(block) as usize;
        disk.read_at(&mut buf[..n], offset)
            .map_err(|source| DiskError::Read {
                path: path_of(disk),
                offset,
                source,
            })?;
        f(offset, &buf[..n]);
        offset += n as u64;
    }
    Ok(())
}

/// CRC-32 of a whole disk (the tests' equality check).
pub fn disk_crc(disk: &Disk) -> Result<u32, DiskError> {
    let mut h = crc32fast::Hasher::new();
    for_each_block(disk, SYNC_BLOCK, |_, b| h.update(b))?;
    Ok(h.finalize())
}

/// `disk0=XXXXXXXX disk1=…`: the CRC of each of `disks`, for the test hooks.
pub fn crc_line(disks: &[Disk]) -> String {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| match disk_crc(d) {
            Ok(c) => format!("disk{i}={c:08x}"),
            Err(e) => format!("disk{i}=error({e})"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// SHA-256 of each [`SYNC_BLOCK`] of `disk`, in order.
pub fn block_hashes(disk: &Disk) -> Result<Vec<[u8; HASH_LEN]>, DiskError> {
    let mut out = Vec::with_capacity(size_of(disk).div_ceil(SYNC_BLOCK) as usize);
    for_each_block(disk, SYNC_BLOCK, |_, b| {
        let d = ring::digest::digest(&ring::digest::SHA256, b);
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(d.as_ref());
        out.push(h);
    })?;
    Ok(out)
}

/// The blocks whose hashes differ (or that one side lacks).
pub fn differing_blocks<'a>(
    ours: &'a [[u8; HASH_LEN]],
    theirs: &'a [[u8; HASH_LEN]],
) -> impl Iterator<Item = u64> + 'a {
    ours.iter()
        .enumerate()
        .filter(move |(i, h)| theirs.get(*i) != Some(*h))
        .map(|(i, _)| i as u64)
}

/// Refuses a write of `len` bytes at `offset` that passes the end of `d`.
fn check_range(d: &Disk, offset: u64, len: usize) -> Result<(), DiskError> {
    let size = size_of(d);
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange {
            path: path_of(d),
            offset,
            len: len as u64,
            size,
        }),
    }
}

/// Most bytes of blocks in one initial-sync frame.
const SYNC_BATCH: usize = 16 << 20;

/// What an initial disk sync did.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncReport {
    /// Blocks of every disk.
    pub blocks: u64,
    /// Blocks sent (differing, or all).
    pub sent_blocks: u64,
    /// Bytes of blocks sent.
    pub bytes: u64,
    /// Time spent, hashing included.
    pub took: Duration,
}

/// Brings each replica equal to `disks` (the guest may be writing them:
/// its writes are journaled from before this started, and replayed after):
/// with `theirs` (the replicas' block hashes) only the blocks whose hash
/// differs are sent, without it every block. Each batch of write records
/// goes to `send(disk, records)`.
pub fn sync_disks<E>(
    disks: &[Disk],
    theirs: Option<&[Vec<[u8; HASH_LEN]>]>,
    mut send: impl FnMut(u32, &[u8]) -> Result<(), E>,
) -> Result<SyncReport, E>
where
    E: From<DiskError>,
{
    let t = Instant::now();
    let mut report = SyncReport::default();
    let mut batch = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let size = size_of(d);
        let blocks = size.div_ceil(SYNC_BLOCK);
        report.blocks += blocks;
        let todo: Vec<u64> = match theirs {
            Some(theirs) => {
                let ours = block_hashes(d)?;
                let empty = Vec::new();
                differing_blocks(&ours, theirs.get(i).unwrap_or(&empty)).collect()
            }
            None => (0..blocks).collect(),
        };
        for b in todo {
            let offset = b * SYNC_BLOCK;
            let len = (size - offset).min(SYNC_BLOCK) as usize;
            let data = write_record(&mut batch, offset, len);
            d.read_at(data, offset).map_err(|source| DiskError::Read {
                path: path_of(d),
                offset,
                source,
            })?;
            report.sent_blocks += 1;
            report.bytes += len as u64;
            if batch.len() >= SYNC_BATCH {
                send(i as u32, &batch)?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            send(i as u32, &batch)?;
            batch.clear();
        }
    }
    report.took = t.elapsed();
    Ok(report)
}

/// The primary's journals, one per disk, and the sealed epoch of each.
pub struct DiskJournals {
    journals: Vec<Arc<Journal>>,
    sealed: Vec<JournalEpoch>,
}

impl DiskJournals {
    /// The journals of `vm`'s disks (not recording yet).
    pub fn new(vm: &Vm) -> Self {
        let journals: Vec<_> = vm
            .devices
            .blk()
            .iter()
            .map(|b| b.with_device(|d| d.journal()))
            .collect();
        let sealed = journals.iter().map(|_| JournalEpoch::default()).collect();
        DiskJournals { journals, sealed }
    }

    /// Records every disk's writes from now on. Each journal starts under
    /// its device's lock, which the device's worker holds while it serves a
    /// request: no write is half-way, so none can reach the file unrecorded
    /// after the initial sync read its block.
    pub fn start(&self, vm: &Vm) {
        for b in vm.devices.blk() {
            b.with_device(|d| d.journal().start());
        }
    }

    /// Stops recording (no standby).
    pub fn stop(&self) {
        self.journals.iter().for_each(|j| j.stop());
    }

    /// The epoch cut (devices quiesced): takes each disk's open epoch.
    /// Allocation-free once every journal has a spare.
    pub fn seal(&mut self) -> JournalCounts {
        let mut counts = JournalCounts::default();
        for (j, slot) in self.journals.iter().zip(self.sealed.iter_mut()) {
            let old = std::mem::replace(slot, j.seal());
            j.recycle(old);
            counts += slot.counts();
        }
        counts
    }

    /// The sealed records of each disk, with its index.
    pub fn sealed(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.sealed
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u32, e.as_bytes()))
    }
}

/// The standby's replicas: second handles on its VM's disk files.
pub struct Replicas {
    disks: Vec<Disk>,
}

impl Replicas {
    /// The replicas of `vm`'s disks.
    pub fn new(vm: &Vm) -> Result<Self, DiskError> {
        Ok(Replicas {
            disks: clone_disks(vm)?,
        })
    }

    /// The replicas.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    fn replica(&self, disk: u32) -> Result<&Disk, DiskError> {
        self.disks.get(disk as usize).ok_or(DiskError::NoSuchDisk {
            disk,
            disks: self.disks.len(),
        })
    }

    /// Applies disk `disk`'s records (from a verified checkpoint) in order;
    /// makes the replica durable when they hold a flush. A write out of the
    /// replica's bounds is refused before anything of `bytes` is written.
    pub fn apply(&self, disk: u32, bytes: &[u8]) -> Result<JournalCounts, DiskError> {
        let d = self.replica(disk)?;
        for r in records(bytes) {
            if let Record::Write { offset, data } = r? {
                check_range(d, offset, data.len())?;
            }
        }
        let mut counts = JournalCounts::default();
        for r in records(bytes) {
            match r? {
                Record::Write { offset, data } => {
                    d.write_at(data, offset)
                        .map_err(|source| DiskError::Write {
                            path: path_of(d),
                            offset,
                            source,
                        })?;
                    counts.writes += 1;
                    counts.write_bytes += data.len() as u64;
                }
                Record::Flush => counts.flushes += 1,
            }
        }
        if counts.flushes > 0 {
            d.flush().map_err(|source| DiskError::Flush {
                path: path_of(d),
                source,
            })?;
        }
        Ok(counts)
    }

    /// Writes whole blocks of the initial sync at `offset`.
    pub fn write_block(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let d = self.replica(disk)?;
        check_range(d, offset, data.len())?;
        d.write_at(data, offset).map_err(|source| DiskError::Write {
            path: path_of(d),
            offset,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_blocks_finds_changed_and_missing() {
        let a = [[1u8; 32], [2; 32], [3; 32]];
        let b = [[1u8; 32], [9; 32]];
        assert_eq!(differing_blocks(&a, &b).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(differing_blocks(&a, &a).count(), 0);
    }

    fn image(tag: &str, bytes: &[u8]) -> (std::path::PathBuf, Disk) {
        let p = std::env::temp_dir().join(format!("ftvmm-disk-{tag}-{}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let d = Disk::open(&p, false).unwrap();
        (p, d)
    }

    #[test]
    fn replicas_apply_in_order_and_refuse_out_of_range() {
        let (p, d) = image("apply", &[0u8; 4096]);
        let r = Replicas { disks: vec![d] };
        let j = Journal::new();
        j.start();
        for (off, byte) in [(512u64, 1u8), (512, 2), (1024, 3)] {
            j.write(off, 512, |b| {
                b.fill(byte);
                true
            });
        }
        j.flush();
        let e = j.seal();
        let c = r.apply(0, e.as_bytes()).unwrap();
        assert_eq!((c.writes, c.flushes), (3, 1));
        let f = std::fs::read(&p).unwrap();
        assert!(f[512..1024].iter().all(|&b| b == 2), "the later write wins");
        assert!(f[1024..1536].iter().all(|&b| b == 3));
        assert!(matches!(
            r.apply(1, e.as_bytes()),
            Err(DiskError::NoSuchDisk { .. })
        ));
        let j2 = Journal::new();
        j2.start();
        j2.write(3584, 1024, |_| true);
        let before = std::fs::read(&p).unwrap();
        assert!(matches!(
            r.apply(0, j2.seal().as_bytes()),
            Err(DiskError::OutOfRange { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), before, "nothing written");
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn hashes_and_crc_see_every_block() {
        let mut bytes = vec![0u8; (SYNC_BLOCK * 2 + 512) as usize];
        let (p, d) = image("hash", &bytes);
        let h0 = block_hashes(&d).unwrap();
        assert_eq!(h0.len(), 3);
        let c0 = disk_crc(&d).unwrap();
        bytes[(SYNC_BLOCK * 2 + 7) as usize] = 1;
        std::fs::write(&p, &bytes).unwrap();
        let h1 = block_hashes(&d).unwrap();
        assert_eq!(differing_blocks(&h1, &h0).collect::<Vec<_>>(), [2]);
        assert_ne!(disk_crc(&d).unwrap(), c0);
        let _ = std::fs::remove_file(p);
    }
}
