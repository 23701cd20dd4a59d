//! The `vmm` backend: frames held per epoch in the VMM's memory.
//!
//! Every NIC's transmit sink ([`NicSink`]) appends the guest's frames to the
//! open epoch's buffer (one contiguous byte buffer and a frame index per
//! epoch, reused, so steady state does not allocate). Sealing moves the open
//! epoch to the sealed queue; a release writes its frames, in the order the
//! guest sent them, each to its own NIC's tap ([`Wire`]).
//!
//! Memory bound (`limit`), decided as follows:
//! - When the open epoch reaches half the limit, the buffer raises its cut
//!   eventfd: the epoch driver cuts the epoch now instead of at its timer.
//! - A frame that would take the held total (sealed + open) past the limit
//!   while a sealed epoch awaits its ack waits (the device worker is held:
//!   backpressure, the guest's transmit ring fills as on a busy wire) until
//!   a release or release-all frees memory. Nothing is dropped.
//! - With nothing sealed, only the cut the driver was asked for can free
//!   memory, and the cut needs the worker at a request boundary (the device
//!   pause waits for it): the worker waits at most 10 ms, then the frame is
//!   taken past the limit and counted (`over_limit`). That needs the guest
//!   to send half the limit between the cut request and the cut, or to
//!   flood during the initial sync (before the first cut).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::{FieldSummary, Histogram};
use ftvmm_devices::virtio::net::{FrameSink, Tap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Backend, EpochBuffer, EpochQueue, Held, NetOutput, NetbufError, OutputCommit};

/// Longest a device worker is held for memory: past it (a release that never
/// comes would mean a stuck epoch driver) the frame is taken over the limit.
const BACKPRESSURE_MAX: Duration = Duration::from_secs(10);
/// Longest a device worker is held when no epoch awaits an ack (the cut
/// that frees memory then needs the worker at a request boundary).
const BACKPRESSURE_BRIEF: Duration = Duration::from_millis(10);
/// How long a release waits for a full tap to take a frame.
const WIRE_WAIT: Duration = Duration::from_millis(20);

/// Where released frames go: a NIC's tap, or a recorder in tests.
pub trait Wire: Send {
    /// Writes one Ethernet frame (no virtio header).
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

impl Wire for Tap {
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let deadline = Instant::now() + WIRE_WAIT;
        loop {
            match Tap::write_frame(self, frame) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(e);
                    }
                    let mut pfd = libc::pollfd {
                        fd: self.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, alive across the call.
                    unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// One held frame: where it is in its epoch's bytes, which NIC, since when.
#[derive(Debug, Clone, Copy)]
struct FrameRec {
    nic: u16,
    off: u32,
    len: u32,
    at: Instant,
}

/// One epoch's output.
#[derive(Debug, Default)]
struct EpochBuf {
    data: Vec<u8>,
    frames: Vec<FrameRec>,
}

impl EpochBuffer for EpochBuf {
    fn held(&self) -> Held {
        Held {
            frames: self.frames.len() as u64,
            bytes: self.data.len() as u64,
        }
    }

    fn clear(&mut self) {
        self.data.clear();
        self.frames.clear();
    }
}

/// Counters and the held-time histogram of a netbuf.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetbufReport {
    /// The limit, bytes.
    pub limit_bytes: u64,
    /// Frames that were held (entered a held epoch).
    pub frames_held: u64,
    /// Bytes that were held.
    pub bytes_held: u64,
    /// Frames released to the taps.
    pub frames_released: u64,
    /// Bytes released.
    pub bytes_released: u64,
    /// Frames dropped because their epoch never committed (fenced).
    pub frames_discarded: u64,
    /// Frames a tap refused on release (it stayed full).
    pub frames_wire_dropped: u64,
    /// Early cuts requested (the open epoch reached half the limit).
    pub early_cuts: u64,
    /// Frames that waited for memory (backpressure).
    pub backpressure_waits: u64,
    /// Frames taken past the limit.
    pub over_limit: u64,
    /// Most bytes held at once.
    pub peak_bytes: u64,
    /// Time each released frame was held, µs.
    pub held_us: FieldSummary,
}

struct Inner {
    queue: EpochQueue<EpochBuf>,
    wires: Vec<Box<dyn Wire>>,
    cut_raised: bool,
    hist: Histogram,
    report: NetbufReport,
}

impl Inner {
    fn held_bytes(&self) -> usize {
        self.queue.held().bytes as usize
    }

    fn write_out(&mut self, nic: usize, frame: &[u8]) -> bool {
        write_frame(&mut self.wires, &mut self.report, nic, frame)
    }

    /// Lets out every sealed epoch up to `epoch` (all of them and the open
    /// one with `all`), recording each frame's held time.
    fn release(&mut self, epoch: u64, all: bool) -> Held {
        let now = Instant::now();
        let Inner {
            queue,
            wires,
            hist,
            report,
            ..
        } = self;
        let mut out = |buf: &EpochBuf| {
            for f in &buf.frames {
                let frame = &buf.data[f.off as usize..(f.off + f.len) as usize];
                write_frame(wires, report, f.nic as usize, frame);
                hist.record(now.saturating_duration_since(f.at).as_micros() as u64);
            }
        };
        let held = if all {
            queue.release_all(&mut out)
        } else {
            queue.release_upto(epoch, &mut out)
        };
        self.report.frames_released += held.frames;
        self.report.bytes_released += held.bytes;
        held
    }
}

/// Writes one frame to NIC `nic`'s wire; a refusal is counted, not fatal.
fn write_frame(
    wires: &mut [Box<dyn Wire>],
    report: &mut NetbufReport,
    nic: usize,
    frame: &[u8],
) -> bool {
    let Some(w) = wires.get_mut(nic) else {
        return false;
    };
    match w.write_frame(frame) {
        Ok(()) => true,
        Err(e) => {
            report.frames_wire_dropped += 1;
            log::debug!(
                "netbuf: NIC {nic}: frame of {} bytes dropped: {e}",
                frame.len()
            );
            false
        }
    }
}

/// The `vmm` backend's buffer, shared by the epoch driver and the NICs'
/// sinks.
pub struct HeldFrames {
    inner: Mutex<Inner>,
    /// Signalled when memory is freed or protection ends.
    space: Condvar,
    cut: EventFd,
    limit: usize,
}

impl std::fmt::Debug for HeldFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("HeldFrames")
            .field("holding", &i.queue.holding())
            .field("limit", &self.limit)
            .field("held", &i.queue.held())
            .finish()
    }
}

impl HeldFrames {
    /// A buffer for NICs whose frames go to `wires` (in NIC order), holding
    /// at most `limit` bytes. It passes frames through until
    /// [`OutputCommit::hold`].
    pub fn new(wires: Vec<Box<dyn Wire>>, limit: usize) -> Result<Arc<Self>, NetbufError> {
        let cut = EventFd::new(EFD_NONBLOCK).map_err(NetbufError::EventFd)?;
        let limit = limit.max(1);
        Ok(Arc::new(HeldFrames {
            inner: Mutex::new(Inner {
                queue: EpochQueue::new(),
                wires,
                cut_raised: false,
                hist: Histogram::new(),
                report: NetbufReport {
                    limit_bytes: limit as u64,
                    ..NetbufReport::default()
                },
            }),
            space: Condvar::new(),
            cut,
            limit,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transmit sink of NIC `nic`.
    pub fn sink(self: &Arc<Self>, nic: usize) -> NicSink {
        NicSink {
            buf: self.clone(),
            nic: nic as u16,
        }
    }

    /// Bytes held now (sealed and open).
    pub fn held_bytes(&self) -> usize {
        self.lock().held_bytes()
    }

    /// Takes one frame the guest sent on NIC `nic`.
    pub fn push(&self, nic: usize, frame: &[u8]) {
        let mut i = self.lock();
        if i.queue.holding() && i.held_bytes() + frame.len() > self.limit {
            i.report.backpressure_waits += 1;
            let start = Instant::now();
            while i.queue.holding() && i.held_bytes() + frame.len() > self.limit {
                // With an epoch awaiting its ack, its release frees memory:
                // wait for it. With none, only the cut the driver is about to
                // make can, and it needs this worker: wait only briefly.
                let max = if i.queue.sealed().bytes > 0 {
                    BACKPRESSURE_MAX
                } else {
                    BACKPRESSURE_BRIEF
                };
                let left = max.saturating_sub(start.elapsed());
                if left.is_zero() {
                    if i.queue.sealed().bytes > 0 {
                        log::warn!(
                            "netbuf: no ack freed memory within {BACKPRESSURE_MAX:?}; holding a frame past the {} byte limit",
                            self.limit
                        );
                    }
                    break;
                }
                i = self
                    .space
                    .wait_timeout(i, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if !i.queue.holding() {
            i.write_out(nic, frame);
            return;
        }
        if i.held_bytes() + frame.len() > self.limit {
            i.report.over_limit += 1;
        }
        let open = i.queue.open();
        let off = open.data.len() as u32;
        open.data.extend_from_slice(frame);
        open.frames.push(FrameRec {
            nic: nic as u16,
            off,
            len: frame.len() as u32,
            at: Instant::now(),
        });
        let open_bytes = open.data.len();
        i.report.frames_held += 1;
        i.report.bytes_held += frame.len() as u64;
        let now = i.held_bytes() as u64;
        if now > i.report.peak_bytes {
            i.report.peak_bytes = now;
        }
        if !i.cut_raised && open_bytes >= self.limit / 2 {
            i.cut_raised = true;
            i.report.early_cuts += 1;
            if let Err(e) = self.cut.write(1) {
                log::warn!("netbuf: cannot raise the early-cut eventfd: {e}");
            }
        }
    }
}

impl HeldFrames {
    fn clear_cut(&self, i: &mut Inner) {
        if i.cut_raised {
            i.cut_raised = false;
            let _ = self.cut.read();
        }
    }
}

impl OutputCommit for HeldFrames {
    fn hold(&self) {
        self.lock().queue.hold();
    }

    fn seal(&self, epoch: u64) -> Held {
        let mut i = self.lock();
        self.clear_cut(&mut i);
        i.queue.seal(epoch)
    }

    fn release_upto(&self, epoch: u64) -> Held {
        let total = self.lock().release(epoch, false);
        if total.frames > 0 {
            self.space.notify_all();
        }
        total
    }

    fn discard_after(&self, epoch: u64) {
        let mut i = self.lock();
        let dropped = i.queue.discard_after(epoch);
        i.report.frames_discarded += dropped.frames;
        drop(i);
        self.space.notify_all();
    }

    fn release_all(&self) {
        let mut i = self.lock();
        self.clear_cut(&mut i);
        i.release(u64::MAX, true);
        drop(i);
        self.space.notify_all();
    }

    fn cut_event(&self) -> Option<&EventFd> {
        Some(&self.cut)
    }
}

impl NetOutput for HeldFrames {
    fn backend(&self) -> Backend {
        Backend::Vmm
    }

    fn report(&self) -> NetbufReport {
        let i = self.lock();
        NetbufReport {
            held_us: i.hist.summarize(),
            ..i.report
        }
    }
}

/// A NIC's transmit sink: frames go into the shared [`HeldFrames`].
pub struct NicSink {
    buf: Arc<HeldFrames>,
    nic: u16,
}

impl FrameSink for NicSink {
    fn send(&mut self, frame: &[u8]) {
        self.buf.push(self.nic as usize, frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Log = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

    /// Records (nic, frame) in write order.
    #[derive(Clone, Default)]
    struct Rec(Log, usize);

    impl Wire for Rec {
        fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push((self.1, frame.to_vec()));
            Ok(())
        }
    }

    fn two_nics(limit: usize) -> (Arc<HeldFrames>, Rec) {
        let rec = Rec::default();
        let wires: Vec<Box<dyn Wire>> = vec![
            Box::new(Rec(rec.0.clone(), 0)),
            Box::new(Rec(rec.0.clone(), 1)),
        ];
        (HeldFrames::new(wires, limit).unwrap(), rec)
    }

    fn out(rec: &Rec) -> Vec<(usize, Vec<u8>)> {
        rec.0.lock().unwrap().clone()
    }

    #[test]
    fn passes_through_until_hold_then_releases_per_epoch_in_order() {
        let (b, rec) = two_nics(1 << 20);
        let (mut s0, mut s1) = (b.sink(0), b.sink(1));
        s0.send(b"boot");
        assert_eq!(out(&rec), vec![(0, b"boot".to_vec())]);
        b.hold();
        s0.send(b"a1");
        s1.send(b"b1");
        assert_eq!(
            b.seal(1),
            Held {
                frames: 2,
                bytes: 4
            }
        );
        s1.send(b"b2");
        s0.send(b"a2");
        assert_eq!(
            b.seal(2),
            Held {
                frames: 2,
                bytes: 4
            }
        );
        s0.send(b"a3");
        assert_eq!(out(&rec).len(), 1, "nothing leaves before its ack");
        assert_eq!(b.release_upto(1).frames, 2);
        assert_eq!(out(&rec)[1..], [(0, b"a1".to_vec()), (1, b"b1".to_vec())]);
        assert_eq!(b.release_upto(1).frames, 0);
        assert_eq!(b.held_bytes(), 6);
        b.release_all();
        let o = out(&rec);
        assert_eq!(
            o[3..],
            [
                (1, b"b2".to_vec()),
                (0, b"a2".to_vec()),
                (0, b"a3".to_vec())
            ]
        );
        s1.send(b"after");
        assert_eq!(out(&rec).last().unwrap(), &(1, b"after".to_vec()));
        let r = b.report();
        assert_eq!(r.frames_held, 5);
        assert_eq!(r.frames_released, 5);
        assert_eq!(r.held_us.count, 5);
    }

    #[test]
    fn discard_drops_epochs_that_never_commit() {
        let (b, rec) = two_nics(1 << 20);
        let mut s = b.sink(0);
        b.hold();
        s.send(b"1");
        b.seal(1);
        s.send(b"2");
        b.seal(2);
        s.send(b"3");
        b.release_upto(1);
        b.discard_after(1);
        b.release_upto(10);
        assert_eq!(out(&rec), vec![(0, b"1".to_vec())]);
        assert_eq!(b.report().frames_discarded, 2);
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn early_cut_is_signalled_at_half_the_limit_and_cleared_by_seal() {
        let (b, _rec) = two_nics(1000);
        let mut s = b.sink(0);
        b.hold();
        s.send(&[0u8; 400]);
        assert!(b.cut.read().is_err(), "not yet at half the limit");
        s.send(&[0u8; 200]);
        s.send(&[0u8; 10]);
        assert_eq!(b.report().early_cuts, 1);
        b.seal(1);
        assert!(b.cut.read().is_err(), "seal clears the request");
        s.send(&[0u8; 100]);
        assert_eq!(b.report().early_cuts, 1);
    }

    #[test]
    fn backpressure_waits_for_the_ack_and_never_drops() {
        let limit = 10_000;
        let (b, rec) = two_nics(limit);
        b.hold();
        let mut s = b.sink(0);
        for _ in 0..6 {
            s.send(&[1u8; 1000]);
        }
        b.seal(1);
        // A worker floods: it must stop at the limit until epoch 1 commits.
        let b2 = b.clone();
        let worker = std::thread::spawn(move || {
            let mut s = b2.sink(1);
            for _ in 0..20 {
                s.send(&[2u8; 1000]);
            }
        });
        assert!(wait(|| b.report().backpressure_waits == 1));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            b.held_bytes(),
            limit,
            "the worker fills up to the limit and waits"
        );
        assert!(!worker.is_finished());
        b.release_upto(1);
        // Now nothing is sealed: the rest is taken (the driver would cut).
        worker.join().unwrap();
        b.seal(2);
        b.release_upto(2);
        let r = b.report();
        assert_eq!(out(&rec).len(), 26, "no frame lost");
        assert!(r.peak_bytes as usize <= limit + 1000 * 10);
        assert_eq!(r.frames_released, 26);
    }

    #[test]
    fn memory_stays_under_the_limit_when_the_driver_cuts_on_request() {
        // A worker floods while a driver thread cuts whenever asked and
        // acks after a delay: no frame is lost, the peak stays ≤ limit.
        let limit = 64 * 1024;
        let (b, rec) = two_nics(limit);
        b.hold();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let driver = {
            let b = b.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut epoch = 0;
                let fd = b.cut_event().unwrap().as_raw_fd();
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 50) };
                    epoch += 1;
                    b.seal(epoch);
                    std::thread::sleep(Duration::from_millis(3)); // the ack
                    b.release_upto(epoch);
                }
                b.release_all();
                epoch
            })
        };
        let mut s = b.sink(0);
        let n = 3000u32;
        for k in 0..n {
            let mut f = vec![0u8; 1000];
            f[..4].copy_from_slice(&k.to_le_bytes());
            s.send(&f);
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let epochs = driver.join().unwrap();
        let o = out(&rec);
        assert_eq!(o.len(), n as usize, "no frame lost");
        for (k, (_, f)) in o.iter().enumerate() {
            assert_eq!(u32::from_le_bytes(f[..4].try_into().unwrap()), k as u32);
        }
        let r = b.report();
        assert!(r.early_cuts > 0 && epochs > 10);
        assert!(
            r.peak_bytes as usize <= limit,
            "peak {} > limit {limit}",
            r.peak_bytes
        );
        assert_eq!(r.over_limit, 0);
    }

    fn wait(mut f: impl FnMut() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}
