//! Waiting for one socket with a deadline, on vmm-sys-util's epoll and timerfd.
//!
//! A [`Readiness`] is an epoll set holding the socket and a timerfd. The
//! deadline arms the timerfd (nanosecond precision on the monotonic clock,
//! the one `Instant` uses), so a wait ends exactly when it should, where
//! `epoll_wait`'s millisecond timeout would add up to a tick.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

/// Event data of the socket.
const SOCKET: u64 = 0;
/// Event data of the deadline timer.
const DEADLINE: u64 = 1;

/// A timerfd that ends an epoll wait at a deadline: register
/// [`DeadlineTimer::fd`] in the epoll set, then pass
/// [`DeadlineTimer::arm`]'s result as the wait's timeout.
#[derive(Debug)]
pub(crate) struct DeadlineTimer {
    timer: TimerFd,
    /// The timer may be armed or have fired (readable) since the last wait.
    armed: bool,
}

impl DeadlineTimer {
    pub(crate) fn new() -> io::Result<DeadlineTimer> {
        Ok(DeadlineTimer {
            timer: TimerFd::new()?,
            armed: false,
        })
    }

    /// The timerfd, for the epoll set.
    pub(crate) fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Sets the timer for `deadline` and returns the epoll timeout to wait
    /// with: -1 (the timer ends the wait, or no deadline), or 0 when the
    /// deadline already passed (only check). Re-arming or disarming also
    /// clears an expiry from an earlier wait.
    pub(crate) fn arm(&mut self, deadline: Option<Instant>) -> io::Result<i32> {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        Ok(match left {
            Some(left) if !left.is_zero() => {
                self.timer.reset(left, None)?;
                self.armed = true;
                -1
            }
            _ => {
                if self.armed {
                    self.timer.clear()?;
                    self.armed = false;
                }
                if left.is_some() {
                    0
                } else {
                    -1
                }
            }
        })
    }
}

/// `epoll_wait` into `events`, retried on `EINTR`; the events that fired.
pub(crate) fn wait_events(
    epoll: &Epoll,
    timeout_ms: i32,
    events: &mut [EpollEvent],
) -> io::Result<usize> {
    loop {
        match epoll.wait(timeout_ms, events) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Waits until a socket has some events, or a deadline passes.
#[derive(Debug)]
pub(crate) struct Readiness {
    epoll: Epoll,
    timer: DeadlineTimer,
}

impl Readiness {
    /// Watches `fd` (a socket the caller keeps open as long as this lives)
    /// for `events`. Errors and hang-ups always count as ready: the next call
    /// on the socket reports them.
    pub(crate) fn new(fd: RawFd, events: EventSet) -> io::Result<Readiness> {
        let epoll = Epoll::new()?;
        let timer = DeadlineTimer::new()?;
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, SOCKET))?;
        epoll.ctl(
            ControlOperation::Add,
            timer.fd(),
            EpollEvent::new(EventSet::IN, DEADLINE),
        )?;
        Ok(Readiness { epoll, timer })
    }

    /// Waits until the socket is ready (`Ok(true)`) or `deadline` passes
    /// (`Ok(false)`); `None` waits for the socket only. A deadline already
    /// past only checks, without blocking. Retries on `EINTR`.
    pub(crate) fn wait_until(&mut self, deadline: Option<Instant>) -> io::Result<bool> {
        let timeout_ms = self.timer.arm(deadline)?;
        let mut events = [EpollEvent::default(); 2];
        let n = wait_events(&self.epoll, timeout_ms, &mut events)?;
        // Only the deadline (or nothing, when only checking) fired: timed out.
        Ok(events[..n].iter().any(|e| e.data() == SOCKET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::tcp_pair;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn readable_socket_deadline_and_check() {
        let (mut a, b) = tcp_pair();
        let mut r = Readiness::new(b.as_raw_fd(), EventSet::IN).unwrap();
        // Nothing to read: a check returns at once, a deadline is honoured.
        assert!(!r.wait_until(Some(Instant::now())).unwrap());
        let t0 = Instant::now();
        assert!(!r.wait_until(Some(t0 + Duration::from_millis(30))).unwrap());
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // The expired timer does not make the next wait end early.
        let t1 = Instant::now();
        assert!(!r.wait_until(Some(t1 + Duration::from_millis(20))).unwrap());
        assert!(t1.elapsed() >= Duration::from_millis(20));
        // Data: ready, with or without a deadline.
        a.write_all(b"x").unwrap();
        assert!(r.wait_until(None).unwrap());
        assert!(r
            .wait_until(Some(Instant::now() + Duration::from_secs(5)))
            .unwrap());
        assert!(r.wait_until(Some(Instant::now())).unwrap());
    }

    #[test]
    fn hang_up_counts_as_ready() {
        let (a, b) = tcp_pair();
        let mut r = Readiness::new(b.as_raw_fd(), EventSet::IN).unwrap();
        drop(a);
        assert!(r
            .wait_until(Some(Instant::now() + Duration::from_secs(5)))
            .unwrap());
    }
}
