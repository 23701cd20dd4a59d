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

/// Waits until a socket has some events, or a deadline passes.
#[derive(Debug)]
pub(crate) struct Readiness {
    epoll: Epoll,
    timer: TimerFd,
    /// The timer may be armed or have fired (readable) since the last wait.
    armed: bool,
}

impl Readiness {
    /// Watches `fd` (a socket the caller keeps open as long as this lives)
    /// for `events`. Errors and hang-ups always count as ready: the next call
    /// on the socket reports them.
    pub(crate) fn new(fd: RawFd, events: EventSet) -> io::Result<Readiness> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, SOCKET))?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, DEADLINE),
        )?;
        Ok(Readiness {
            epoll,
            timer,
            armed: false,
        })
    }

    /// Waits until the socket is ready (`Ok(true)`) or `deadline` passes
    /// (`Ok(false)`); `None` waits for the socket only. A deadline already
    /// past only checks, without blocking. Retries on `EINTR`.
    pub(crate) fn wait_until(&mut self, deadline: Option<Instant>) -> io::Result<bool> {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        // Re-arming or disarming also clears an expiry from an earlier wait.
        let timeout_ms = match left {
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
        };
        let mut events = [EpollEvent::default(); 2];
        let n = loop {
            match self.epoll.wait(timeout_ms, &mut events) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
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
