//! The runner's wait between epochs: one epoll set over the VM's exit
//! events, a timerfd for the epoch boundary (nanosecond precision: poll's
//! milliseconds would make every epoch up to 1 ms late, which output commit
//! pays directly), the standby's failure event, the netbuf's early-cut
//! request, the dirty rings' full signal and the control API's mailbox.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::session::Session;
use super::FtError;
use crate::vcpu::VmExit;
use crate::vm::Vm;

/// Why [`Waiter::wait`] returned.
#[derive(Debug)]
pub enum Wake {
    /// The guest ended.
    Exit(VmExit),
    /// The epoch boundary (or an early cut) came.
    Boundary,
    /// The standby was declared lost.
    Lost,
    /// A control request waits.
    Api,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Exit = 0,
    Timer,
    Lost,
    Cut,
    RingFull,
    Api,
}

/// The event sources of one protection state (rebuilt when it changes).
pub struct Waiter {
    epoll: Epoll,
    timer: TimerFd,
    events: [EpollEvent; 8],
}

/// What a protected VM also waits on.
pub struct Protected<'a> {
    /// The standby's failure event.
    pub session: &'a Session,
    /// The netbuf's early-cut request.
    pub cut: Option<&'a EventFd>,
    /// A vCPU's dirty ring is full.
    pub ring_full: Option<&'a EventFd>,
}

impl Waiter {
    /// Watches `vm`'s end, the control API's `api` and, when protected,
    /// the sources of `protected`.
    pub fn new(
        vm: &Vm,
        api: Option<&EventFd>,
        protected: Option<Protected<'_>>,
    ) -> Result<Waiter, FtError> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new().map_err(|e| FtError::Io(e.into()))?;
        let add = |src: Source, fd: i32| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, src as u64),
            )
        };
        for e in vm.exit_fds() {
            add(Source::Exit, e.as_raw_fd())?;
        }
        add(Source::Timer, timer.as_raw_fd())?;
        if let Some(api) = api {
            add(Source::Api, api.as_raw_fd())?;
        }
        if let Some(p) = protected {
            add(Source::Lost, p.session.failure_event().as_raw_fd())?;
            if let Some(cut) = p.cut {
                add(Source::Cut, cut.as_raw_fd())?;
            }
            if let Some(ring) = p.ring_full {
                add(Source::RingFull, ring.as_raw_fd())?;
            }
        }
        Ok(Waiter {
            epoll,
            timer,
            events: [EpollEvent::default(); 8],
        })
    }

    /// Whether a control request waits (a poll that does not block; the
    /// set is level-triggered, so nothing is consumed).
    fn api_waiting(&mut self) -> bool {
        match self.epoll.wait(0, &mut self.events) {
            Ok(n) => self.events[..n]
                .iter()
                .any(|e| e.data() == Source::Api as u64),
            Err(_) => false,
        }
    }

    /// Waits until `deadline`, the guest's end, the standby's loss, an early
    /// cut, a full dirty ring, or a control request.
    pub fn wait(
        &mut self,
        vm: &Vm,
        session: Option<&Session>,
        ring_full: Option<&EventFd>,
        deadline: Instant,
    ) -> Wake {
        loop {
            if let Some(r) = vm.exit_reason() {
                return Wake::Exit(r);
            }
            if session.is_some_and(|s| s.failure().is_some()) {
                return Wake::Lost;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Epochs that overrun their interval must not starve the
                // control API: a request already waiting is answered first.
                if self.api_waiting() {
                    return Wake::Api;
                }
                return Wake::Boundary;
            }
            // A zero duration would disarm the timer: at least 1 ns.
            if let Err(e) = self.timer.reset(left.max(Duration::from_nanos(1)), None) {
                log::warn!("cannot arm the epoch timer: {e}");
                std::thread::sleep(left.min(Duration::from_millis(1)));
                continue;
            }
            let n = match self.epoll.wait(-1, &mut self.events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("epoll_wait: {e}");
                    continue;
                }
            };
            let ready = |src: Source| self.events[..n].iter().any(|e| e.data() == src as u64);
            if ready(Source::Api) {
                return Wake::Api;
            }
            if ready(Source::RingFull) {
                // A vCPU's dirty ring is full: harvest now.
                let _ = ring_full.map(|r| r.read());
                return Wake::Boundary;
            }
            if ready(Source::Cut) {
                // Sealing the epoch clears the request.
                return Wake::Boundary;
            }
            // The timer, the exit events and the failure event are checked
            // at the top.
        }
    }
}
