//! Output commit, written once for every kind of output a protected VM holds
//! (DESIGN I1): the console's bytes, the NICs' frames, and whatever comes
//! next (disk writes held on the standby).
//!
//! - [`OutputCommit`] is the interface the epoch driver drives: hold when
//!   protection begins, seal at each epoch cut, release on the standby's
//!   ack, discard what a takeover made void, release everything when the
//!   standby is gone.
//! - [`EpochQueue`] is the bookkeeping behind it: the open epoch, the sealed
//!   epochs awaiting their ack (oldest first), and emptied buffers kept for
//!   reuse so that steady state allocates nothing. Each output keeps one in
//!   its own lock and says only how a buffer leaves the host.
//! - [`Outputs`] is the set of a VM's outputs, driven as one.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Items (frames; 0 for a byte stream) and bytes of held output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Frames (network); a byte stream counts none.
    pub frames: u64,
    /// Bytes.
    pub bytes: u64,
}

impl std::ops::AddAssign for Held {
    fn add_assign(&mut self, o: Held) {
        self.frames += o.frames;
        self.bytes += o.bytes;
    }
}

/// The output commit of one kind of output, as the epoch driver uses it.
/// Every method is called from the epoch driver's thread; output arrives
/// concurrently from the devices.
pub trait OutputCommit: Send + Sync + fmt::Debug {
    /// Protection begins: output is held from now on.
    fn hold(&self);
    /// Closes epoch `epoch`'s output (call with the vCPUs and devices
    /// paused, next to the checkpoint's cut); new output belongs to the
    /// next epoch. Returns what the closed epoch holds.
    fn seal(&self, epoch: u64) -> Held;
    /// The standby acknowledged `epoch`: lets out every sealed epoch up to
    /// and including it, in order. Returns what was released.
    fn release_upto(&self, epoch: u64) -> Held;
    /// Drops the output of every epoch after `epoch` (sealed or open): a
    /// standby that took over from `epoch` fenced this primary (I5).
    fn discard_after(&self, epoch: u64);
    /// Protection ended (the standby is gone): lets out everything held, in
    /// order, and passes later output straight through.
    fn release_all(&self);
    /// An eventfd that becomes readable when the output wants the epoch cut
    /// now (its limit is near); [`OutputCommit::seal`] clears it.
    fn cut_event(&self) -> Option<&EventFd> {
        None
    }
}

/// One epoch's held output, reusable after [`EpochBuffer::clear`].
pub trait EpochBuffer: Default + Send {
    /// What it holds.
    fn held(&self) -> Held;
    /// Empties it, keeping its capacity.
    fn clear(&mut self);
}

impl EpochBuffer for Vec<u8> {
    fn held(&self) -> Held {
        Held {
            frames: 0,
            bytes: self.len() as u64,
        }
    }

    fn clear(&mut self) {
        Vec::clear(self)
    }
}

/// The held epochs of one output: the open one, the sealed ones awaiting
/// their ack, and spare buffers. Until [`EpochQueue::hold`] (and again after
/// [`EpochQueue::release_all`]) it holds nothing: the owner passes output
/// straight through ([`EpochQueue::holding`] is false).
#[derive(Debug)]
pub struct EpochQueue<B> {
    holding: bool,
    open: B,
    sealed: VecDeque<(u64, B)>,
    sealed_held: Held,
    spare: Vec<B>,
}

impl<B: EpochBuffer> Default for EpochQueue<B> {
    fn default() -> Self {
        EpochQueue {
            holding: false,
            open: B::default(),
            sealed: VecDeque::with_capacity(4),
            sealed_held: Held::default(),
            spare: Vec::new(),
        }
    }
}

impl<B: EpochBuffer> EpochQueue<B> {
    /// An empty queue that holds nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// True while output is held (protected).
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Starts holding.
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// The epoch in progress, to add output to.
    pub fn open(&mut self) -> &mut B {
        &mut self.open
    }

    /// What the sealed epochs hold.
    pub fn sealed(&self) -> Held {
        self.sealed_held
    }

    /// What is held now, sealed and open.
    pub fn held(&self) -> Held {
        let mut h = self.sealed_held;
        h += self.open.held();
        h
    }

    /// The oldest sealed epoch and its output.
    pub fn front(&self) -> Option<(u64, &B)> {
        self.sealed.front().map(|(e, b)| (*e, b))
    }

    /// Closes the open epoch as `epoch` (nothing, when not holding).
    pub fn seal(&mut self, epoch: u64) -> Held {
        if !self.holding {
            return Held::default();
        }
        let fresh = self.spare.pop().unwrap_or_default();
        let buf = std::mem::replace(&mut self.open, fresh);
        let held = buf.held();
        self.sealed_held += held;
        self.sealed.push_back((epoch, buf));
        held
    }

    /// Hands every sealed epoch up to and including `epoch` to `out`, oldest
    /// first, and recycles it.
    pub fn release_upto(&mut self, epoch: u64, mut out: impl FnMut(&B)) -> Held {
        let mut total = Held::default();
        while self.sealed.front().is_some_and(|(e, _)| *e <= epoch) {
            let (_, buf) = self.sealed.pop_front().expect("front exists");
            out(&buf);
            total += self.recycle(buf);
        }
        self.sealed_held.frames -= total.frames;
        self.sealed_held.bytes -= total.bytes;
        total
    }

    /// Drops every sealed epoch after `epoch`, and the open one. Returns
    /// what was dropped.
    pub fn discard_after(&mut self, epoch: u64) -> Held {
        let mut sealed = Held::default();
        while self.sealed.back().is_some_and(|(e, _)| *e > epoch) {
            let (_, buf) = self.sealed.pop_back().expect("back exists");
            sealed += self.recycle(buf);
        }
        self.sealed_held.frames -= sealed.frames;
        self.sealed_held.bytes -= sealed.bytes;
        let mut dropped = sealed;
        dropped += self.open.held();
        self.open.clear();
        dropped
    }

    /// Hands everything held to `out` in order (sealed epochs, then the
    /// open one) and stops holding.
    pub fn release_all(&mut self, mut out: impl FnMut(&B)) -> Held {
        let mut total = self.release_upto(u64::MAX, &mut out);
        out(&self.open);
        total += self.open.held();
        self.open.clear();
        self.holding = false;
        total
    }

    fn recycle(&mut self, mut buf: B) -> Held {
        let held = buf.held();
        buf.clear();
        self.spare.push(buf);
        held
    }
}

/// A VM's outputs (console, network, …), driven as one: each call goes to
/// every member in the order they were added.
#[derive(Debug, Default, Clone)]
pub struct Outputs {
    members: Vec<Arc<dyn OutputCommit>>,
}

impl Outputs {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `output` to the set.
    pub fn add(&mut self, output: Arc<dyn OutputCommit>) {
        self.members.push(output);
    }
}

impl OutputCommit for Outputs {
    fn hold(&self) {
        self.members.iter().for_each(|m| m.hold());
    }

    fn seal(&self, epoch: u64) -> Held {
        let mut total = Held::default();
        for m in &self.members {
            total += m.seal(epoch);
        }
        total
    }

    fn release_upto(&self, epoch: u64) -> Held {
        let mut total = Held::default();
        for m in &self.members {
            total += m.release_upto(epoch);
        }
        total
    }

    fn discard_after(&self, epoch: u64) {
        self.members.iter().for_each(|m| m.discard_after(epoch));
    }

    fn release_all(&self) {
        self.members.iter().for_each(|m| m.release_all());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(q: &mut EpochQueue<Vec<u8>>, b: &[u8]) {
        q.open().extend_from_slice(b);
    }

    #[test]
    fn seals_releases_and_discards_in_epoch_order() {
        let mut q = EpochQueue::<Vec<u8>>::new();
        assert_eq!(q.seal(1), Held::default(), "nothing held before hold()");
        q.hold();
        push(&mut q, b"aa");
        assert_eq!(q.seal(1).bytes, 2);
        push(&mut q, b"b");
        assert_eq!(q.seal(2).bytes, 1);
        push(&mut q, b"ccc");
        assert_eq!(q.held().bytes, 6);
        assert_eq!(q.sealed().bytes, 3);
        let mut out = Vec::new();
        assert_eq!(q.release_upto(1, |b| out.extend_from_slice(b)).bytes, 2);
        assert_eq!(out, b"aa");
        assert_eq!(q.release_upto(1, |b| out.extend_from_slice(b)).bytes, 0);
        assert_eq!(q.front().map(|(e, _)| e), Some(2));
        assert_eq!(q.release_all(|b| out.extend_from_slice(b)).bytes, 4);
        assert_eq!(out, b"aabccc");
        assert!(!q.holding());
        assert_eq!(q.held(), Held::default());
    }

    #[test]
    fn discard_drops_later_epochs_and_the_open_one() {
        let mut q = EpochQueue::<Vec<u8>>::new();
        q.hold();
        for (e, b) in [(1, b"1"), (2, b"2"), (3, b"3")] {
            push(&mut q, b);
            q.seal(e);
        }
        push(&mut q, b"open");
        assert_eq!(q.discard_after(1).bytes, 6);
        assert_eq!(q.held().bytes, 1);
        let mut out = Vec::new();
        q.release_upto(10, |b| out.extend_from_slice(b));
        assert_eq!(out, b"1");
    }

    #[test]
    fn steady_state_reuses_buffers() {
        let mut q = EpochQueue::<Vec<u8>>::new();
        q.hold();
        for e in 1..=3 {
            push(&mut q, &[0; 100]);
            q.seal(e);
            q.release_upto(e, |_| {});
        }
        assert!(q.spare.len() <= 2, "buffers are recycled, not piled up");
        assert!(q.open().capacity() >= 100 || q.spare.iter().any(|b| b.capacity() >= 100));
    }

    #[derive(Debug, Default)]
    struct Count(std::sync::Mutex<Vec<&'static str>>);
    impl OutputCommit for Count {
        fn hold(&self) {
            self.0.lock().unwrap().push("hold");
        }
        fn seal(&self, _: u64) -> Held {
            Held {
                frames: 1,
                bytes: 10,
            }
        }
        fn release_upto(&self, _: u64) -> Held {
            Held::default()
        }
        fn discard_after(&self, _: u64) {
            self.0.lock().unwrap().push("discard");
        }
        fn release_all(&self) {
            self.0.lock().unwrap().push("all");
        }
    }

    #[test]
    fn outputs_drive_every_member() {
        let (a, b) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let mut set = Outputs::new();
        set.add(a.clone());
        set.add(b.clone());
        set.hold();
        assert_eq!(
            set.seal(1),
            Held {
                frames: 2,
                bytes: 20
            }
        );
        set.discard_after(1);
        set.release_all();
        for m in [a, b] {
            assert_eq!(*m.0.lock().unwrap(), ["hold", "discard", "all"]);
        }
    }
}
