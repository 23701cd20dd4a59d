//! virtio-blk over a file (see the contract in [`crate::virtio`]).
//!
//! Requests are served on the device's worker thread, synchronously, one
//! chain at a time: reads land in guest memory through vm-memory (so they
//! are dirty-tracked), and every guest write to the disk goes through one
//! function, [`Disk::write_at`]; while the VM is protected its data passes
//! through the disk's [`Journal`] on the way (docs/design.md "Disk").

pub mod journal;
pub mod persist;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub use journal::{Journal, JournalCounts, JournalEpoch};
pub use persist::{BlockDeviceState, BlockRestoreError, BlockState, BlockStateError};

use super::mmio::VirtioDevice;
use super::net::read_config_bytes;
use super::{features, GuestMemory, QUEUE_MAX_SIZE, TYPE_BLOCK};

/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const DISK_ID_LEN: usize = 20;
/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request types.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request types.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request types.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Bytes moved per host I/O call (bounds the bounce buffer).
const CHUNK: usize = 64 * 1024;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file cannot be opened.
    #[error("cannot open disk '{path}': {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Its size cannot be read.
    #[error("cannot read the size of disk '{path}': {source}")]
    Metadata {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Smaller than one sector.
    #[error("disk '{path}' is {size} bytes: a disk needs at least one 512-byte sector")]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// Counters of one disk, updated lock-free.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Requests completed OK.
    pub ok: AtomicU64,
    /// Requests answered IOERR.
    pub ioerr: AtomicU64,
    /// Requests answered UNSUPP.
    pub unsupp: AtomicU64,
    /// Chains so malformed that no status could be written.
    pub malformed: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
}

/// The backing file.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    readonly: bool,
    capacity: u64,
}

impl Disk {
    /// Opens `path` (read-only when `readonly`). Its capacity is its size
    /// rounded down to whole sectors; an empty file is refused.
    pub fn open(path: &Path, readonly: bool) -> Result<Disk, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Metadata {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            readonly,
            capacity: size / SECTOR_SIZE,
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether guest writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Reads `buf.len()` bytes at byte `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Every guest write to the disk goes through here.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes every write so far durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// A second handle on the same file (for replication: hashing, applying
    /// a primary's writes on a standby).
    pub fn try_clone(&self) -> std::io::Result<Disk> {
        Ok(Disk {
            file: self.file.try_clone()?,
            path: self.path.clone(),
            readonly: self.readonly,
            capacity: self.capacity,
        })
    }
}

/// The GET_ID answer for a disk file: its file name, NUL-padded or cut to
/// 20 bytes.
pub fn disk_id(path: &Path) -> [u8; DISK_ID_LEN] {
    let mut id = [0u8; DISK_ID_LEN];
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = name.len().min(DISK_ID_LEN);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

/// A segment of a descriptor chain.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u64,
}

/// Walks `segs` from byte `skip`, for `len` bytes, yielding (guest address,
/// length) pieces of at most `CHUNK` bytes.
fn pieces(
    segs: &[Seg],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(GuestAddress, usize) -> bool,
) -> bool {
    for s in segs {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let mut addr = s.addr + skip;
        let mut avail = (s.len - skip).min(len);
        skip = 0;
        len -= avail;
        while avail > 0 {
            let n = avail.min(CHUNK as u64);
            if !f(GuestAddress(addr), n as usize) {
                return false;
            }
            addr += n;
            avail -= n;
        }
    }
    true
}

/// The virtio-blk device model.
pub struct Block {
    disk: Disk,
    id: [u8; DISK_ID_LEN],
    metrics: Arc<BlockMetrics>,
    journal: Arc<Journal>,
    buf: Vec<u8>,
    readable: Vec<Seg>,
    writable: Vec<Seg>,
}

impl Block {
    /// A disk on `disk`.
    pub fn new(disk: Disk) -> Block {
        let id = disk_id(&disk.path);
        Block {
            disk,
            id,
            metrics: Arc::new(BlockMetrics::default()),
            journal: Arc::new(Journal::new()),
            buf: vec![0; CHUNK],
            readable: Vec::new(),
            writable: Vec::new(),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The write journal (recording while the VM is protected).
    pub fn journal(&self) -> Arc<Journal> {
        self.journal.clone()
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Serves one request whose readable and writable segments are in
    /// `self.readable` / `self.writable`; returns (status, bytes written
    /// into guest data buffers).
    fn serve(&mut self, mem: &GuestMemory) -> (u8, u64) {
        let r_total: u64 = self.readable.iter().map(|s| s.len).sum();
        let w_total: u64 = self.writable.iter().map(|s| s.len).sum();
        let mut hdr = [0u8; 16];
        if r_total < 16 {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let mut got = 0usize;
        let ok = pieces(&self.readable, 0, 16, |a, n| {
            let r = mem.read_slice(&mut hdr[got..got + n], a).is_ok();
            got += n;
            r
        });
        if !ok {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let req = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        // The last writable byte is the status.
        let w_data = w_total - 1;
        let in_range = |len: u64| {
            sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= self.disk.capacity * SECTOR_SIZE)
        };
        match req {
            VIRTIO_BLK_T_IN => {
                if r_total != 16 || !in_range(w_data) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut offset = sector * SECTOR_SIZE;
                let (disk, buf) = (&self.disk, &mut self.buf);
                let ok = pieces(&self.writable, 0, w_data, |a, n| {
                    let r = disk.read_at(&mut buf[..n], offset).is_ok()
                        && mem.write_slice(&buf[..n], a).is_ok();
                    offset += n as u64;
                    r
                });
                if !ok {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.metrics.read_bytes.fetch_add(w_data, Ordering::Relaxed);
                (VIRTIO_BLK_S_OK, w_data)
            }
            VIRTIO_BLK_T_OUT => {
                let len = r_total - 16;
                if self.disk.readonly || w_data != 0 || !in_range(len) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let start = sector * SECTOR_SIZE;
                let (disk, readable) = (&self.disk, &self.readable);
                // Protected: the data goes from guest memory into the
                // journal and from there to the file (no copy added).
                let journaled = self.journal.write(start, len as usize, |data| {
                    let mut done = 0usize;
                    pieces(readable, 16, len, |a, n| {
                        let r = mem.read_slice(&mut data[done..done + n], a).is_ok();
                        done += n;
                        r
                    }) && disk.write_at(data, start).is_ok()
                });
                let ok = journaled.unwrap_or_else(|| {
                    let (mut offset, buf) = (start, &mut self.buf);
                    pieces(readable, 16, len, |a, n| {
                        let r = mem.read_slice(&mut buf[..n], a).is_ok()
                            && disk.write_at(&buf[..n], offset).is_ok();
                        offset += n as u64;
                        r
                    })
                });
                if !ok {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.metrics.write_bytes.fetch_add(len, Ordering::Relaxed);
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => {
                    self.journal.flush();
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(e) => {
                    log::warn!("disk '{}': flush failed: {e}", self.disk.path.display());
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = w_data.min(DISK_ID_LEN as u64);
                let mut done = 0usize;
                let id = self.id;
                let ok = pieces(&self.writable, 0, n, |a, k| {
                    let r = mem.write_slice(&id[done..done + k], a).is_ok();
                    done += k;
                    r
                });
                if !ok {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, n)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn process_requests(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemory,
        stop: &AtomicBool,
    ) -> bool {
        let mut used = false;
        let q = &mut queues[0];
        while !stop.load(Ordering::SeqCst) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            self.readable.clear();
            self.writable.clear();
            let mut order_ok = true;
            for d in chain {
                let seg = Seg {
                    addr: d.addr().0,
                    len: u64::from(d.len()),
                };
                if d.is_write_only() {
                    self.writable.push(seg);
                } else if self.writable.is_empty() {
                    self.readable.push(seg);
                } else {
                    order_ok = false;
                }
            }
            // The status byte: the last byte of the last writable segment.
            let status_addr = self
                .writable
                .last()
                .filter(|s| s.len > 0)
                .and_then(|s| s.addr.checked_add(s.len - 1));
            let len = match status_addr {
                None => {
                    self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "disk '{}': chain {head} has no status byte",
                        self.disk.path.display()
                    );
                    0
                }
                Some(addr) => {
                    let (status, data) = if order_ok {
                        self.serve(mem)
                    } else {
                        (VIRTIO_BLK_S_IOERR, 0)
                    };
                    let counter = match status {
                        VIRTIO_BLK_S_OK => &self.metrics.ok,
                        VIRTIO_BLK_S_IOERR => &self.metrics.ioerr,
                        _ => &self.metrics.unsupp,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = mem.write_obj(status, GuestAddress(addr)) {
                        log::debug!(
                            "disk '{}': cannot write status: {e}",
                            self.disk.path.display()
                        );
                    }
                    (data + 1) as u32
                }
            };
            if let Err(e) = q.add_used(mem, head, len) {
                log::warn!(
                    "disk '{}': add_used failed: {e:?}",
                    self.disk.path.display()
                );
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn name(&self) -> String {
        format!("virtio-blk '{}'", self.disk.path.display())
    }

    fn device_features(&self) -> u64 {
        let ro = if self.disk.readonly {
            features::BLK_RO
        } else {
            0
        };
        features::VERSION_1 | features::BLK_SEG_MAX | features::BLK_FLUSH | ro
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 16];
        cfg[0..8].copy_from_slice(&self.disk.capacity.to_le_bytes());
        // size_max (8..12) unset; seg_max: a chain has a header and a status.
        cfg[12..16].copy_from_slice(&(u32::from(QUEUE_MAX_SIZE) - 2).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        stop: &AtomicBool,
    ) -> bool {
        index == 0 && self.process_requests(queues, mem, stop)
    }
}

#[cfg(test)]
mod tests;
