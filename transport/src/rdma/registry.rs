//! Registration bookkeeping for staging slabs sent from without a copy.
//!
//! A plain RDMA channel registers the slabs of the staging it sends
//! checkpoints from (`ibv_reg_mr`) and keeps the registrations here, keyed
//! by address (see `channel.rs`, "Data path"). A checkpoint's send then
//! looks each chunk up: a chunk wholly inside a registered slab becomes a
//! scatter/gather element with that registration's lkey; anything else is
//! copied into the channel's own registered bounce slab.
//!
//! Staging slabs are long-lived (the head slab is permanent, the cache only
//! grows or halves after several strikes), so registrations happen when the
//! slab cache grows and are dropped when it shrinks, never per checkpoint.
//! The registry is generic over what a registration is, so this
//! bookkeeping is tested without a device.

use std::collections::BTreeMap;

/// Counters of a [`Registry`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// Buffers registered.
    pub registered: u64,
    /// Buffers deregistered.
    pub deregistered: u64,
    /// `register` calls for a buffer already registered (nothing done).
    pub repeats: u64,
    /// Chunk lookups that found a registration.
    pub hits: u64,
    /// Chunk lookups that did not (the chunk is copied).
    pub misses: u64,
}

/// Why a buffer could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// It overlaps a registered buffer that is not the same range.
    #[error("buffer at {addr:#x} ({len} bytes) overlaps the registered buffer at {other:#x} ({other_len} bytes)")]
    Overlap {
        /// The new buffer's address.
        addr: usize,
        /// Its length.
        len: usize,
        /// The registered buffer's address.
        other: usize,
        /// Its length.
        other_len: usize,
    },
}

/// Registered buffers by start address; `R` is the registration (dropping
/// it deregisters).
#[derive(Debug)]
pub struct Registry<R> {
    regions: BTreeMap<usize, (usize, R)>,
    stats: RegistryStats,
}

impl<R> Default for Registry<R> {
    fn default() -> Self {
        Registry {
            regions: BTreeMap::new(),
            stats: RegistryStats::default(),
        }
    }
}

impl<R> Registry<R> {
    /// Registers `[addr, addr + len)` with `register` unless exactly that
    /// range is registered already; true if it registered. Empty buffers
    /// are ignored.
    pub fn insert_with<E>(
        &mut self,
        addr: usize,
        len: usize,
        register: impl FnOnce() -> Result<R, E>,
    ) -> Result<bool, InsertError<E>> {
        if len == 0 {
            return Ok(false);
        }
        if let Some((l, _)) = self.regions.get(&addr) {
            if *l == len {
                self.stats.repeats += 1;
                return Ok(false);
            }
        }
        let end = addr.saturating_add(len);
        let before = self.regions.range(..=addr).next_back();
        let after = self.regions.range(addr..).next();
        for (&start, &(l, _)) in before.into_iter().chain(after) {
            if start < end && addr < start.saturating_add(l) {
                return Err(InsertError::Overlap(RegistryError::Overlap {
                    addr,
                    len,
                    other: start,
                    other_len: l,
                }));
            }
        }
        let r = register().map_err(InsertError::Register)?;
        self.regions.insert(addr, (len, r));
        self.stats.registered += 1;
        Ok(true)
    }

    /// The registration that wholly contains `[addr, addr + len)`, and the
    /// offset of `addr` in it.
    pub fn find(&mut self, addr: usize, len: usize) -> Option<(&R, usize)> {
        let found = self
            .regions
            .range(..=addr)
            .next_back()
            .filter(|(&start, &(l, _))| addr.saturating_add(len) <= start.saturating_add(l))
            .map(|(&start, (_, r))| (r, addr - start));
        if found.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        found
    }

    /// Removes (and so deregisters) every buffer.
    pub fn clear(&mut self) {
        self.stats.deregistered += self.regions.len() as u64;
        self.regions.clear();
    }

    /// Buffers registered now.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The counters.
    pub fn stats(&self) -> RegistryStats {
        self.stats
    }
}

/// Why [`Registry::insert_with`] failed.
#[derive(Debug)]
pub enum InsertError<E> {
    /// The range overlaps another registration.
    Overlap(RegistryError),
    /// The registration itself failed.
    Register(E),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A registration that counts itself alive.
    struct Mr {
        key: u32,
        alive: Rc<Cell<i32>>,
    }

    impl Drop for Mr {
        fn drop(&mut self) {
            self.alive.set(self.alive.get() - 1);
        }
    }

    /// A slab cache that grows and halves like the checkpoint crate's
    /// staging, registered as the RDMA channel does it: new slabs when it
    /// grew; once slabs were freed, everything dropped and the survivors
    /// registered again.
    struct Slabs {
        slabs: Vec<Box<[u8]>>,
        reg: Registry<Mr>,
        alive: Rc<Cell<i32>>,
        next_key: u32,
    }

    impl Slabs {
        fn new() -> Slabs {
            let mut s = Slabs {
                slabs: Vec::new(),
                reg: Registry::default(),
                alive: Rc::new(Cell::new(0)),
                next_key: 1,
            };
            s.grow_to(1);
            s
        }

        fn register(&mut self, i: usize) {
            let slab = &self.slabs[i];
            let (key, alive) = (self.next_key, self.alive.clone());
            self.next_key += 1;
            let new = self
                .reg
                .insert_with(slab.as_ptr() as usize, slab.len(), || {
                    alive.set(alive.get() + 1);
                    Ok::<_, ()>(Mr { key, alive })
                })
                .unwrap();
            assert!(new);
        }

        fn grow_to(&mut self, n: usize) {
            while self.slabs.len() < n {
                self.slabs.push(vec![0u8; 4096].into_boxed_slice());
                self.register(self.slabs.len() - 1);
            }
        }

        fn halve(&mut self) {
            let keep = (self.slabs.len() / 2).max(1);
            self.slabs.truncate(keep);
            self.reg.clear();
            for i in 0..keep {
                self.register(i);
            }
        }

        /// One epoch's send: every slab's used part is looked up.
        fn send(&mut self) -> Vec<u32> {
            let chunks: Vec<(usize, usize)> = self
                .slabs
                .iter()
                .map(|s| (s.as_ptr() as usize + 16, s.len() - 16))
                .collect();
            chunks
                .into_iter()
                .map(|(a, l)| self.reg.find(a, l).expect("registered").0.key)
                .collect()
        }
    }

    #[test]
    fn slabs_register_once_and_again_only_when_the_cache_grows_or_shrinks() {
        let mut s = Slabs::new();
        s.grow_to(4);
        for _ in 0..10 {
            assert_eq!(s.send(), [1, 2, 3, 4]);
        }
        let st = s.reg.stats();
        assert_eq!((st.registered, st.deregistered), (4, 0));
        assert_eq!(st.hits, 40);
        assert_eq!(s.alive.get(), 4);

        s.halve(); // strikes: 4 → 2
        assert_eq!(s.send(), [5, 6]);
        assert_eq!(s.reg.stats().deregistered, 4);
        assert_eq!(s.alive.get(), 2, "only the survivors' new registrations");

        s.grow_to(3); // a busy epoch
        for _ in 0..5 {
            assert_eq!(s.send(), [5, 6, 7]);
        }
        let st = s.reg.stats();
        assert_eq!((st.registered, st.deregistered), (7, 4));
        assert_eq!(s.reg.len(), 3);
        assert_eq!(s.alive.get(), 3);
        drop(s);
    }

    #[test]
    fn lookups_need_the_whole_chunk_inside_one_registration() {
        let mut r: Registry<u32> = Registry::default();
        assert!(r.insert_with(0x1000, 0x1000, || Ok::<_, ()>(7)).unwrap());
        assert!(!r.insert_with(0x1000, 0x1000, || Ok::<_, ()>(8)).unwrap());
        assert_eq!(r.stats().repeats, 1);
        assert_eq!(r.find(0x1000, 0x1000), Some((&7, 0)));
        assert_eq!(r.find(0x1800, 0x10), Some((&7, 0x800)));
        assert_eq!(r.find(0x1ff0, 0x20), None, "runs past the end");
        assert_eq!(r.find(0xff0, 0x20), None, "starts before");
        assert_eq!(r.find(0x3000, 1), None);
        assert_eq!((r.stats().hits, r.stats().misses), (2, 3));
    }

    #[test]
    fn overlaps_are_refused_and_failed_registrations_leave_nothing() {
        let mut r: Registry<u32> = Registry::default();
        r.insert_with(0x1000, 0x1000, || Ok::<_, ()>(1)).unwrap();
        for (a, l) in [
            (0x800, 0x900),
            (0x1800, 0x1000),
            (0x1000, 0x800),
            (0, 0x10000),
        ] {
            match r.insert_with(a, l, || -> Result<u32, ()> { panic!("not registered") }) {
                Err(InsertError::Overlap(RegistryError::Overlap { other: 0x1000, .. })) => {}
                other => panic!("{a:#x}+{l:#x}: {other:?}"),
            }
        }
        // Adjacent ranges are fine.
        r.insert_with(0x2000, 0x1000, || Ok::<_, ()>(2)).unwrap();
        r.insert_with(0x800, 0x800, || Ok::<_, ()>(3)).unwrap();
        assert!(matches!(
            r.insert_with(0x9000, 0x10, || Err::<u32, _>("ENOMEM")),
            Err(InsertError::Register("ENOMEM"))
        ));
        assert_eq!(r.len(), 3);
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.stats().deregistered, 3);
        assert!(!r.insert_with(0x5000, 0, || Ok::<_, ()>(9)).unwrap());
        assert_eq!(r.stats().registered, 3);
    }
}
