//! virtio-net over a tap (see the contract in [`crate::virtio`]).
//!
//! Receive: frames read from the tap go into the guest's receive buffers
//! (queue 0) through vm-memory, so they are dirty-tracked. Transmit: every
//! frame the guest queues on queue 1 goes through one [`FrameSink`], given
//! by constructor; the default, [`TapSink`], writes it to the tap at once.
//! Output commit replaces the sink with one that holds frames per epoch.

pub mod persist;
mod tap;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

pub use persist::{NetDeviceState, NetRestoreError, NetState};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

use super::mmio::VirtioDevice;
use super::{features, GuestMemory, TYPE_NET};

/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Largest frame accepted from the tap or the guest (header included).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535;

/// Where the frames the guest transmits go.
pub trait FrameSink: Send {
    /// Takes one complete Ethernet frame (no FCS) the guest transmitted,
    /// *without* the virtio-net header. Called on the device's worker, in
    /// the guest's transmit order. It cannot fail towards the guest: a sink
    /// that cannot pass a frame on drops it and counts it (a tap is a wire).
    fn send(&mut self, frame: &[u8]);
}

/// Counters of one NIC, updated lock-free.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (without header).
    pub rx_bytes: AtomicU64,
    /// Frames from the tap dropped (no room in the guest's buffer).
    pub rx_dropped: AtomicU64,
    /// Frames the guest transmitted (handed to the sink).
    pub tx_frames: AtomicU64,
    /// Bytes the guest transmitted.
    pub tx_bytes: AtomicU64,
    /// Transmit chains that were malformed.
    pub tx_malformed: AtomicU64,
    /// Frames the default sink could not write to the tap (full, down).
    pub tx_dropped: AtomicU64,
}

/// The default sink: straight to the tap. A full tap (EAGAIN) drops the
/// frame, counted in `tx_dropped`, as a congested wire would.
#[derive(Debug)]
pub struct TapSink {
    tap: Tap,
    metrics: Arc<NetMetrics>,
}

impl TapSink {
    /// Writes to `tap`, counting drops in `metrics`.
    pub fn new(tap: Tap, metrics: Arc<NetMetrics>) -> Self {
        TapSink { tap, metrics }
    }
}

impl FrameSink for TapSink {
    fn send(&mut self, frame: &[u8]) {
        if let Err(e) = self.tap.write_frame(frame) {
            self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "tap '{}': frame of {} bytes dropped: {e}",
                self.tap.name(),
                frame.len()
            );
        }
    }
}

/// The default MAC of a NIC on tap `tap`: `02:` (locally administered,
/// unicast) and five bytes of an FNV-1a hash of the name.
pub fn default_mac(tap: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tap.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// The virtio-net device model.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    sink: Box<dyn FrameSink>,
    metrics: Arc<NetMetrics>,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the tap and not yet delivered.
    rx_len: usize,
    /// No receive buffers: wait for the guest's next RX notification
    /// before reading the tap again.
    rx_blocked: bool,
    /// The tap failed (hung up): stop waiting on it.
    tap_broken: bool,
    tx_buf: Vec<u8>,
}

impl Net {
    /// A NIC with MAC `mac` on `tap`; transmitted frames go to `sink`, or
    /// to the tap when `None`.
    pub fn new(tap: Tap, mac: [u8; 6], sink: Option<Box<dyn FrameSink>>) -> std::io::Result<Net> {
        let metrics = Arc::new(NetMetrics::default());
        let sink = match sink {
            Some(s) => s,
            None => Box::new(TapSink::new(tap.try_clone()?, metrics.clone())),
        };
        Ok(Net {
            tap,
            mac,
            sink,
            metrics,
            rx_buf: vec![0; MAX_FRAME],
            rx_len: 0,
            rx_blocked: false,
            tap_broken: false,
            tx_buf: Vec::with_capacity(MAX_FRAME),
        })
    }

    /// The MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// Replaces the transmit sink (output commit puts its buffer here).
    pub fn set_sink(&mut self, sink: Box<dyn FrameSink>) {
        self.sink = sink;
    }

    /// Copies the pending frame, behind a fresh header, into one receive
    /// chain through vm-memory. Returns the used length, or None if the
    /// chain cannot hold it or is not all writable.
    fn write_rx_chain(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Option<u32> {
        // The tap's header (all zeros: no offloads) is replaced in place.
        self.rx_buf[..VNET_HDR_LEN].fill(0);
        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        let bytes = &self.rx_buf[..self.rx_len];
        let mut off = 0usize;
        for d in chain {
            if !d.is_write_only() {
                return None;
            }
            if off == bytes.len() {
                break;
            }
            let n = (d.len() as usize).min(bytes.len() - off);
            mem.write_slice(&bytes[off..off + n], d.addr()).ok()?;
            off += n;
        }
        (off == bytes.len()).then_some(off as u32)
    }

    fn process_rx(&mut self, queues: &mut [Queue], mem: &GuestMemory, stop: &AtomicBool) -> bool {
        let mut used = false;
        while !stop.load(Ordering::SeqCst) {
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(0) => {
                        self.tap_broken = true;
                        log::warn!("tap '{}': end of file; receive stops", self.tap.name());
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.tap_broken = true;
                        log::warn!("tap '{}': read failed, receive stops: {e}", self.tap.name());
                        break;
                    }
                }
            }
            let q = &mut queues[RX_QUEUE];
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No buffer: keep the frame, wait for the guest to add some.
                // (enable_notification says whether some came meanwhile.)
                if q.enable_notification(mem).unwrap_or(false) {
                    continue;
                }
                self.rx_blocked = true;
                break;
            };
            let head = chain.head_index();
            let len = match self.write_rx_chain(chain, mem) {
                Some(n) => {
                    self.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .rx_bytes
                        .fetch_add((self.rx_len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    n
                }
                None => {
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "tap '{}': frame of {} bytes does not fit the receive buffer",
                        self.tap.name(),
                        self.rx_len
                    );
                    0
                }
            };
            self.rx_len = 0;
            if let Err(e) = q.add_used(mem, head, len) {
                log::warn!("tap '{}': add_used failed: {e:?}", self.tap.name());
            }
            used = true;
        }
        used
    }

    fn process_tx(&mut self, queues: &mut [Queue], mem: &GuestMemory, stop: &AtomicBool) -> bool {
        let mut used = false;
        let q = &mut queues[TX_QUEUE];
        while !stop.load(Ordering::SeqCst) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            self.tx_buf.clear();
            let mut ok = true;
            for d in chain {
                let len = d.len() as usize;
                if d.is_write_only() || self.tx_buf.len() + len > MAX_FRAME {
                    ok = false;
                    break;
                }
                let start = self.tx_buf.len();
                self.tx_buf.resize(start + len, 0);
                if mem.read_slice(&mut self.tx_buf[start..], d.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && self.tx_buf.len() > VNET_HDR_LEN {
                let frame = &self.tx_buf[VNET_HDR_LEN..];
                self.metrics.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .tx_bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                self.sink.send(frame);
            } else {
                self.metrics.tx_malformed.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "tap '{}': malformed transmit chain {head} dropped",
                    self.tap.name()
                );
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                log::warn!("tap '{}': add_used failed: {e:?}", self.tap.name());
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn name(&self) -> String {
        format!("virtio-net '{}'", self.tap.name())
    }

    fn device_features(&self) -> u64 {
        features::VERSION_1 | features::NET_MAC | features::NET_STATUS
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        stop: &AtomicBool,
    ) -> bool {
        match index {
            RX_QUEUE => {
                self.rx_blocked = false;
                self.process_rx(queues, mem, stop)
            }
            TX_QUEUE => self.process_tx(queues, mem, stop),
            _ => false,
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        (!self.rx_blocked && !self.tap_broken).then(|| self.tap.as_raw_fd())
    }

    fn process_backend(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemory,
        stop: &AtomicBool,
    ) -> bool {
        if self.rx_blocked || self.tap_broken {
            return false;
        }
        self.process_rx(queues, mem, stop)
    }

    fn reset(&mut self) {
        self.rx_len = 0;
        self.rx_blocked = false;
    }
}

/// Copies `data.len()` bytes of `cfg` from `offset`, zeros past its end.
pub(crate) fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < cfg.len() {
        let n = data.len().min(cfg.len() - off);
        data[..n].copy_from_slice(&cfg[off..off + n]);
    }
}

#[cfg(test)]
mod tests;
