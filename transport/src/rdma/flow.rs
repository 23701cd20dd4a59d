//! Flow control of the RDMA channel's receive ring, both ends, as pure
//! state machines (no verbs calls).
//!
//! The receiver owns a ring of `slabs` registered slabs. The sender writes
//! them strictly in ring order (0, 1, …, slabs − 1, 0, …): one RDMA WRITE
//! (or several) fills slab `i`, then a [`Ctl::Data`] SEND tells the
//! receiver. The receiver takes slabs out in the same order and returns
//! each with a [`Ctl::Credit`] SEND. So:
//!
//! - the sender writes a slab only while it holds its credit (at most
//!   `slabs` in flight) and only once its own previous WRITE from the
//!   matching local bounce slab completed ([`SendRing`]);
//! - data names exactly the next slab in order, credits exactly the oldest
//!   one in flight; anything else is a protocol violation that ends the
//!   channel ([`FlowError`]).
//!
//! [`Ctl::Data`]: super::msg::Ctl::Data
//! [`Ctl::Credit`]: super::msg::Ctl::Credit

use std::collections::VecDeque;

/// A violation of the ring protocol by the peer (or a local bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// A credit arrived with nothing in flight.
    #[error("credit for slab {slab} with no slab in flight")]
    CreditUnexpected {
        /// The slab named.
        slab: u16,
    },
    /// A credit for another slab than the oldest in flight.
    #[error("credit for slab {slab}, expected slab {expected}")]
    CreditOutOfOrder {
        /// The slab named.
        slab: u16,
        /// The oldest slab in flight.
        expected: u16,
    },
    /// Data in another slab than the next in ring order.
    #[error("data in slab {slab}, expected slab {expected}")]
    DataOutOfOrder {
        /// The slab named.
        slab: u16,
        /// The next slab in order.
        expected: u16,
    },
    /// Data of a length the slab cannot hold (or none).
    #[error("data of {len} bytes in slab {slab} (slabs hold 1 to {max})")]
    BadLength {
        /// The slab named.
        slab: u16,
        /// The length announced.
        len: u32,
        /// The slab size.
        max: u32,
    },
    /// More data than the ring holds: the sender ignored its credits.
    #[error("data in slab {slab} while every slab is full")]
    Overrun {
        /// The slab named.
        slab: u16,
    },
    /// Data after the peer closed the stream.
    #[error("data in slab {slab} after the end of the stream")]
    DataAfterClose {
        /// The slab named.
        slab: u16,
    },
    /// A local completion for a slab with no WRITE outstanding.
    #[error("completion for slab {slab} with no write outstanding")]
    CompletionUnexpected {
        /// The slab named.
        slab: u16,
    },
}

/// The sender's view of the peer's receive ring.
#[derive(Debug)]
pub struct SendRing {
    slabs: u16,
    /// Next slab to fill.
    next: u16,
    /// Slabs written whose credit has not come back.
    in_flight: u16,
    /// Slabs whose local WRITE (from the bounce slab of the same index, or
    /// from registered memory) has not completed yet.
    busy: Vec<bool>,
}

impl SendRing {
    /// A ring of `slabs` slabs (at least 1), all credits in hand.
    pub fn new(slabs: u16) -> SendRing {
        assert!(slabs > 0, "a ring has at least one slab");
        SendRing {
            slabs,
            next: 0,
            in_flight: 0,
            busy: vec![false; usize::from(slabs)],
        }
    }

    /// The slab to fill next, if it may be written now: its credit is in
    /// hand and its previous local WRITE completed.
    pub fn writable(&self) -> Option<u16> {
        (self.in_flight < self.slabs && !self.busy[usize::from(self.next)]).then_some(self.next)
    }

    /// The slab [`SendRing::writable`] returned was posted; returns it.
    pub fn posted(&mut self) -> u16 {
        let slab = self
            .writable()
            .expect("posted() only after writable() said yes");
        self.busy[usize::from(slab)] = true;
        self.in_flight += 1;
        self.next = (self.next + 1) % self.slabs;
        slab
    }

    /// The peer returned the credit of `slab`.
    pub fn credit(&mut self, slab: u16) -> Result<(), FlowError> {
        if self.in_flight == 0 {
            return Err(FlowError::CreditUnexpected { slab });
        }
        let oldest = (self.next + self.slabs - self.in_flight) % self.slabs;
        if slab != oldest {
            return Err(FlowError::CreditOutOfOrder {
                slab,
                expected: oldest,
            });
        }
        self.in_flight -= 1;
        Ok(())
    }

    /// The local completion of `slab`'s last work request arrived.
    pub fn completed(&mut self, slab: u16) -> Result<(), FlowError> {
        match self.busy.get_mut(usize::from(slab)) {
            Some(b) if *b => {
                *b = false;
                Ok(())
            }
            _ => Err(FlowError::CompletionUnexpected { slab }),
        }
    }

    /// No local WRITE is outstanding: every source buffer may be reused.
    pub fn idle(&self) -> bool {
        !self.busy.iter().any(|&b| b)
    }

    /// Slabs written and not yet credited.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }
}

/// The receiver's view of its own ring.
#[derive(Debug)]
pub struct RecvRing {
    slabs: u16,
    slab_bytes: u32,
    /// The slab the next data must name.
    expect: u16,
    /// Filled slabs not taken yet, in order: (slab, length).
    ready: VecDeque<(u16, u32)>,
    /// The peer sent [`super::msg::Ctl::Close`].
    closed: bool,
}

impl RecvRing {
    /// A ring of `slabs` slabs of `slab_bytes` each, all empty.
    pub fn new(slabs: u16, slab_bytes: u32) -> RecvRing {
        assert!(slabs > 0, "a ring has at least one slab");
        RecvRing {
            slabs,
            slab_bytes,
            expect: 0,
            ready: VecDeque::with_capacity(usize::from(slabs)),
            closed: false,
        }
    }

    /// The peer filled `slab` with `len` bytes.
    pub fn data(&mut self, slab: u16, len: u32) -> Result<(), FlowError> {
        if self.closed {
            return Err(FlowError::DataAfterClose { slab });
        }
        if slab != self.expect {
            return Err(FlowError::DataOutOfOrder {
                slab,
                expected: self.expect,
            });
        }
        if len == 0 || len > self.slab_bytes {
            return Err(FlowError::BadLength {
                slab,
                len,
                max: self.slab_bytes,
            });
        }
        if self.ready.len() >= usize::from(self.slabs) {
            return Err(FlowError::Overrun { slab });
        }
        self.ready.push_back((slab, len));
        self.expect = (self.expect + 1) % self.slabs;
        Ok(())
    }

    /// The oldest filled slab, if any: (slab, length).
    pub fn front(&self) -> Option<(u16, u32)> {
        self.ready.front().copied()
    }

    /// The oldest filled slab was taken out; returns it (to credit).
    pub fn pop(&mut self) -> u16 {
        self.ready.pop_front().expect("pop() only after front()").0
    }

    /// The peer closed the stream.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// The peer closed the stream and every slab was taken.
    pub fn at_end(&self) -> bool {
        self.closed && self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_waits_for_credits_and_local_completions_in_ring_order() {
        let mut s = SendRing::new(3);
        for want in 0..3 {
            assert_eq!(s.writable(), Some(want));
            assert_eq!(s.posted(), want);
        }
        assert_eq!(s.in_flight(), 3);
        assert_eq!(s.writable(), None, "no credit left");
        // The credit of slab 0 alone is not enough while its WRITE runs.
        s.credit(0).unwrap();
        assert_eq!(s.writable(), None, "slab 0's write has not completed");
        s.completed(0).unwrap();
        assert_eq!(s.writable(), Some(0));
        assert!(!s.idle());
        s.completed(1).unwrap();
        s.completed(2).unwrap();
        assert!(s.idle());
        // Wrap around: 0 again, then credits 1, 2, 0 in order.
        assert_eq!(s.posted(), 0);
        s.credit(1).unwrap();
        s.credit(2).unwrap();
        s.credit(0).unwrap();
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.credit(0), Err(FlowError::CreditUnexpected { slab: 0 }));
    }

    #[test]
    fn sender_rejects_credits_out_of_order_and_stray_completions() {
        let mut s = SendRing::new(4);
        s.posted();
        s.posted();
        assert_eq!(
            s.credit(1),
            Err(FlowError::CreditOutOfOrder {
                slab: 1,
                expected: 0
            })
        );
        assert_eq!(
            s.completed(3),
            Err(FlowError::CompletionUnexpected { slab: 3 })
        );
        assert_eq!(
            s.completed(9),
            Err(FlowError::CompletionUnexpected { slab: 9 })
        );
        s.completed(0).unwrap();
        assert_eq!(
            s.completed(0),
            Err(FlowError::CompletionUnexpected { slab: 0 })
        );
    }

    #[test]
    fn receiver_takes_slabs_in_order_and_checks_the_sender() {
        let mut r = RecvRing::new(2, 4096);
        assert_eq!(r.front(), None);
        r.data(0, 10).unwrap();
        r.data(1, 4096).unwrap();
        assert_eq!(r.data(0, 1), Err(FlowError::Overrun { slab: 0 }));
        assert_eq!(r.front(), Some((0, 10)));
        assert_eq!(r.pop(), 0);
        assert_eq!(
            r.data(1, 1),
            Err(FlowError::DataOutOfOrder {
                slab: 1,
                expected: 0
            })
        );
        assert_eq!(
            r.data(0, 4097),
            Err(FlowError::BadLength {
                slab: 0,
                len: 4097,
                max: 4096
            })
        );
        assert!(r.data(0, 0).is_err(), "empty data");
        r.data(0, 5).unwrap();
        r.close();
        assert!(!r.at_end(), "two slabs still to take");
        assert_eq!(r.data(1, 1), Err(FlowError::DataAfterClose { slab: 1 }));
        assert_eq!((r.pop(), r.pop()), (1, 0));
        assert!(r.at_end());
    }

    #[test]
    fn a_long_exchange_keeps_both_ends_in_step() {
        // Sender and receiver driven together with a random interleaving:
        // every credit the receiver returns is one the sender accepts.
        let (mut s, mut r) = (SendRing::new(5), RecvRing::new(5, 100));
        let mut credits = VecDeque::new();
        let mut x = 0x9e37_79b9_u32;
        let (mut sent, mut taken) = (0u32, 0u32);
        while taken < 1000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match x % 3 {
                0 if sent < 1000 => {
                    if s.writable().is_some() {
                        let slab = s.posted();
                        s.completed(slab).unwrap();
                        r.data(slab, 1 + sent % 100).unwrap();
                        sent += 1;
                    }
                }
                1 => {
                    if let Some((_, len)) = r.front() {
                        assert_eq!(len, 1 + taken % 100);
                        credits.push_back(r.pop());
                        taken += 1;
                    }
                }
                _ => {
                    if let Some(slab) = credits.pop_front() {
                        s.credit(slab).unwrap();
                    }
                }
            }
        }
        assert_eq!(sent, 1000);
    }
}
