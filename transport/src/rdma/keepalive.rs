//! The MC spec's keepalive over RDMA: each side RDMA-writes a counter into
//! a registered word of the other (its "slot") every heartbeat interval,
//! and watches its own slot; a peer whose counter has not changed for
//! `interval × k` is lost.
//!
//! The verdict goes to the same [`FailureDetector`] the TCP heartbeats feed
//! ([`PeerLost::Keepalive`]), so the VMM waits on one eventfd whichever
//! transport runs. The keepalive has its own queue pair, so a large
//! checkpoint queued on the data queue pair never delays a counter write
//! (the same reason TCP heartbeats have their own connection). It checks
//! the path the checkpoints use; the sealed TCP heartbeats keep carrying
//! the fencing notices (DESIGN I5), which an unauthenticated RDMA write
//! must never be trusted with.
//!
//! [`KeepaliveMonitor`] is the pure state machine (tested with a synthetic
//! clock); [`Keepalive`] is the thread that drives it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::fabric::{Completion, Endpoint, Remote, WcKind, WC_SUCCESS, WC_WR_FLUSH_ERR};
use super::mem::RegisteredBuf;
use crate::heartbeat::{raise_to_realtime, KeepaliveLoss};
use crate::{FailureDetector, PeerLost};

/// What one look at the slot says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The counter changed since the last look (or recently enough).
    Alive,
    /// Unchanged for this many whole intervals, fewer than `k`.
    Quiet {
        /// Intervals without a change.
        intervals: u32,
    },
    /// Unchanged for `interval × k`: the peer is lost.
    Lost(KeepaliveLoss),
}

/// Judges the peer from successive reads of the slot it writes.
#[derive(Debug)]
pub struct KeepaliveMonitor {
    interval: Duration,
    misses: u32,
    last_value: u64,
    last_change: Instant,
}

impl KeepaliveMonitor {
    /// Starts judging at `now` (the slot holds 0 until the peer's first
    /// write); `misses` is `k`, at least 1.
    pub fn new(now: Instant, interval: Duration, misses: u32) -> KeepaliveMonitor {
        KeepaliveMonitor {
            interval: interval.max(Duration::from_millis(1)),
            misses: misses.max(1),
            last_value: 0,
            last_change: now,
        }
    }

    /// Takes in the slot's `value` read at `now`. Any change counts as the
    /// peer being alive at `now`: the slot is read after any stall of ours,
    /// so a peer that kept writing meanwhile is never taken for dead.
    pub fn observe(&mut self, value: u64, now: Instant) -> Liveness {
        if value != self.last_value {
            self.last_value = value;
            self.last_change = now;
            return Liveness::Alive;
        }
        let quiet = now.saturating_duration_since(self.last_change);
        if quiet >= self.interval.saturating_mul(self.misses) {
            return Liveness::Lost(KeepaliveLoss::Silent {
                quiet_ms: quiet.as_millis() as u64,
            });
        }
        match (quiet.as_nanos() / self.interval.as_nanos()) as u32 {
            0 => Liveness::Alive,
            intervals => Liveness::Quiet { intervals },
        }
    }

    /// When silence becomes a loss if the counter does not change.
    pub fn deadline(&self) -> Instant {
        self.last_change + self.interval.saturating_mul(self.misses)
    }
}

/// Sleeps that a stop ends at once.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    cond: Condvar,
}

impl Stop {
    fn raise(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cond.notify_all();
    }

    /// Sleeps until `until` or a stop; true if stopped.
    fn sleep_until(&self, until: Instant) -> bool {
        let mut g = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *g {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The running keepalive; stopping (or dropping) it joins its thread.
pub struct Keepalive {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

/// Most counter writes outstanding at once (then a tick skips its write:
/// the peer is not acknowledging, and the monitor on its side judges).
const MAX_OUTSTANDING: u32 = 4;

impl Keepalive {
    /// Starts writing our counter into `peer_slot` every `interval` over
    /// `ep` (a connected queue pair with a send queue of at least
    /// [`MAX_OUTSTANDING`]) and watching `own_slot`; losses go to
    /// `detector`. The thread ends on a stop, or once the peer is lost.
    pub fn start(
        ep: Arc<dyn Endpoint>,
        own_slot: Arc<RegisteredBuf>,
        peer_slot: Remote,
        detector: Arc<FailureDetector>,
        interval: Duration,
        misses: u32,
        peer: String,
    ) -> std::io::Result<Keepalive> {
        let stop = Arc::new(Stop::default());
        let thread = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("ft-rdma-ka".into())
                .spawn(move || {
                    raise_to_realtime("RDMA keepalive");
                    run(
                        &*ep, &own_slot, peer_slot, &detector, interval, misses, &peer, &stop,
                    )
                })?
        };
        Ok(Keepalive {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.stop.raise();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("RDMA keepalive thread panicked");
            }
        }
    }
}

impl Drop for Keepalive {
    fn drop(&mut self) {
        self.stop();
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    ep: &dyn Endpoint,
    own_slot: &RegisteredBuf,
    peer_slot: Remote,
    detector: &FailureDetector,
    interval: Duration,
    misses: u32,
    peer: &str,
    stop: &Stop,
) {
    let interval = interval.max(Duration::from_millis(1));
    let mut monitor = KeepaliveMonitor::new(Instant::now(), interval, misses);
    let mut counter = 0u64;
    let mut outstanding = 0u32;
    let mut wcs = [Completion {
        wr_id: 0,
        status: 0,
        kind: WcKind::Write,
        byte_len: 0,
    }; 8];
    let mut next_write = Instant::now();
    let declare = |loss: KeepaliveLoss| {
        if detector.declare(PeerLost::Keepalive(loss)) {
            log::warn!("peer {peer} lost: {}", PeerLost::Keepalive(loss));
        }
    };
    loop {
        if detector.failure().is_some() {
            return;
        }
        // Our counter into the peer's slot, every interval.
        let now = Instant::now();
        if now >= next_write {
            if outstanding < MAX_OUTSTANDING {
                counter += 1;
                match ep.post_write_inline(&counter.to_le_bytes(), peer_slot, counter) {
                    Ok(()) => outstanding += 1,
                    Err(e) => log::debug!("RDMA keepalive to {peer}: cannot post: {e}"),
                }
            }
            next_write += interval;
            if next_write <= now {
                next_write = now + interval; // we fell behind (a stall): no burst
            }
        }
        loop {
            match ep.poll(&mut wcs) {
                Ok(0) => break,
                Ok(n) => {
                    for c in &wcs[..n] {
                        outstanding = outstanding.saturating_sub(1);
                        match c.status {
                            WC_SUCCESS => {}
                            // Our own queue pair was shut down: not the peer's doing.
                            WC_WR_FLUSH_ERR => return,
                            status => {
                                declare(KeepaliveLoss::WriteFailed { status });
                                return;
                            }
                        }
                    }
                }
                Err(e) => {
                    log::warn!("RDMA keepalive to {peer}: cannot poll: {e}");
                    break;
                }
            }
        }
        // Their counter in our slot.
        let value = own_slot.word().load(Ordering::Relaxed);
        if let Liveness::Lost(loss) = monitor.observe(value, Instant::now()) {
            declare(loss);
            return;
        }
        // Next: our write, or the loss deadline if it comes first.
        if stop.sleep_until(next_write.min(monitor.deadline())) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_millis(50);

    #[test]
    fn a_counter_that_keeps_changing_is_alive() {
        let t0 = Instant::now();
        let mut m = KeepaliveMonitor::new(t0, I, 5);
        for i in 1..100u64 {
            assert_eq!(m.observe(i, t0 + I * i as u32), Liveness::Alive);
        }
    }

    #[test]
    fn k_intervals_without_a_change_lose_the_peer() {
        let t0 = Instant::now();
        let mut m = KeepaliveMonitor::new(t0, I, 5);
        assert_eq!(m.observe(1, t0 + I), Liveness::Alive);
        let changed = t0 + I;
        assert_eq!(m.deadline(), changed + I * 5);
        assert_eq!(m.observe(1, changed + I / 2), Liveness::Alive);
        for n in 1..5u32 {
            assert_eq!(
                m.observe(1, changed + I * n),
                Liveness::Quiet { intervals: n },
                "{n}"
            );
        }
        assert_eq!(
            m.observe(1, changed + I * 5 - Duration::from_nanos(1)),
            Liveness::Quiet { intervals: 4 }
        );
        assert_eq!(
            m.observe(1, changed + I * 5),
            Liveness::Lost(KeepaliveLoss::Silent { quiet_ms: 250 })
        );
    }

    #[test]
    fn silence_from_the_start_counts_and_a_late_change_revives() {
        let t0 = Instant::now();
        let mut m = KeepaliveMonitor::new(t0, I, 3);
        assert_eq!(m.observe(0, t0 + I * 2), Liveness::Quiet { intervals: 2 });
        // A write that landed during our own stall is seen at the next look.
        assert_eq!(m.observe(7, t0 + I * 10), Liveness::Alive);
        assert_eq!(m.deadline(), t0 + I * 13);
        assert!(matches!(m.observe(7, t0 + I * 13), Liveness::Lost(_)));
    }

    #[test]
    fn a_counter_that_goes_backwards_still_changed() {
        let t0 = Instant::now();
        let mut m = KeepaliveMonitor::new(t0, I, 2);
        assert_eq!(m.observe(9, t0 + I), Liveness::Alive);
        assert_eq!(m.observe(3, t0 + I * 2), Liveness::Alive);
    }

    #[test]
    fn zero_interval_and_k_are_clamped() {
        let t0 = Instant::now();
        let mut m = KeepaliveMonitor::new(t0, Duration::ZERO, 0);
        assert_eq!(m.deadline(), t0 + Duration::from_millis(1));
        assert!(matches!(
            m.observe(0, t0 + Duration::from_millis(1)),
            Liveness::Lost(_)
        ));
    }
}
