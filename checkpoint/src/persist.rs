//! Save/restore of components: the one trait every stateful part of a VM
//! implements (in the spirit of Firecracker's `Persist` and crosvm's
//! `Suspendable`).
//!
//! Every component whose state must survive a failover has a plain-data
//! `<Thing>State` (no fds, no `Arc`s; host resources are named, not held) in a
//! `persist.rs` next to it. States compose upward: device → device manager →
//! VM, and each level's [`Persist`] implementation calls the one of its parts.
//! The VM's state is encoded with [`crate::codec::encode_state`] once per epoch
//! and staged after the dirty pages.
//!
//! Two properties shape the trait:
//!
//! - **The epoch pause does not allocate.** Saving fills a `State` the caller
//!   keeps from one epoch to the next ([`Persist::save_into`]): once its
//!   vectors and strings have grown to size, saving again reuses them.
//! - **A standby restores into components it built itself.** It creates the
//!   machine through the same builder as a boot, with its own host resources
//!   (its tap, its disk replica, its console), then restores the checkpointed
//!   state into it ([`Persist::restore`]). The state read from the wire is
//!   untrusted: restoring validates it against the component and fails with a
//!   typed error, never a panic.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose state can be saved into a plain-data value and restored
/// from one.
pub trait Persist {
    /// The plain-data state: serialisable, no host resources. `Default` is an
    /// empty value to save into (it allocates nothing).
    type State: Serialize + DeserializeOwned + Default;
    /// Why saving failed (`std::convert::Infallible` where it cannot).
    type SaveError: std::error::Error + Send + Sync + 'static;
    /// Why a state could not be restored.
    type RestoreError: std::error::Error + Send + Sync + 'static;

    /// Saves the component's state into `state`, overwriting all of it and
    /// reusing its buffers: after the first epoch this allocates nothing.
    ///
    /// Call it only while the component is quiescent (DESIGN I4): its vCPUs
    /// out of `KVM_RUN`, its device workers at a request boundary.
    fn save_into(&mut self, state: &mut Self::State) -> Result<(), Self::SaveError>;

    /// Restores `state` into this component, which keeps its own host
    /// resources. `state` is untrusted (it came off the wire): it is validated
    /// against the component before it is applied. On error the component may
    /// hold part of the state and must not run; the caller discards it.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::RestoreError>;

    /// Saves the component's state into a new value (outside the epoch pause:
    /// it allocates).
    fn save(&mut self) -> Result<Self::State, Self::SaveError> {
        let mut state = Self::State::default();
        self.save_into(&mut state)?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist_roundtrip_tests;
    use crate::test_utils::PersistPair;
    use serde::Deserialize;

    /// A toy device: a counter with a bounded queue.
    #[derive(Debug)]
    struct Counter {
        value: u64,
        queue: Vec<u8>,
        max_queue: usize,
    }

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct CounterState {
        value: u64,
        queue: Vec<u8>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("counter queue holds {len} bytes, more than the device's {max}")]
    struct CounterError {
        len: usize,
        max: usize,
    }

    impl Persist for Counter {
        type State = CounterState;
        type SaveError = std::convert::Infallible;
        type RestoreError = CounterError;

        fn save_into(&mut self, state: &mut CounterState) -> Result<(), Self::SaveError> {
            state.value = self.value;
            state.queue.clear();
            state.queue.extend_from_slice(&self.queue);
            Ok(())
        }

        fn restore(&mut self, state: &CounterState) -> Result<(), CounterError> {
            if state.queue.len() > self.max_queue {
                return Err(CounterError {
                    len: state.queue.len(),
                    max: self.max_queue,
                });
            }
            self.value = state.value;
            self.queue.clear();
            self.queue.extend_from_slice(&state.queue);
            Ok(())
        }
    }

    fn counter(value: u64, queue: &[u8]) -> Counter {
        Counter {
            value,
            queue: queue.to_vec(),
            max_queue: 8,
        }
    }

    struct Counters(Counter, Counter);

    impl PersistPair for Counters {
        type Component = Counter;
        fn pair(&mut self) -> (&mut Counter, &mut Counter) {
            (&mut self.0, &mut self.1)
        }
    }

    persist_roundtrip_tests! {
        counter_roundtrips: Counters(counter(42, &[1, 2, 3]), counter(0, &[9; 8]));
    }

    /// A save that forgets a field is caught: the restored component's save
    /// differs from the original's.
    #[test]
    #[should_panic(expected = "save after restore differs")]
    fn a_lossy_component_fails_the_roundtrip() {
        struct Lossy(u64);
        impl Persist for Lossy {
            type State = CounterState;
            type SaveError = std::convert::Infallible;
            type RestoreError = std::convert::Infallible;
            fn save_into(&mut self, state: &mut CounterState) -> Result<(), Self::SaveError> {
                state.value = self.0;
                Ok(())
            }
            fn restore(&mut self, _: &CounterState) -> Result<(), Self::RestoreError> {
                Ok(())
            }
        }
        struct Pair(Lossy, Lossy);
        impl PersistPair for Pair {
            type Component = Lossy;
            fn pair(&mut self) -> (&mut Lossy, &mut Lossy) {
                (&mut self.0, &mut self.1)
            }
        }
        crate::test_utils::check_persist_roundtrip(&mut Pair(Lossy(1), Lossy(2)));
    }

    #[test]
    fn save_into_reuses_the_state() {
        let mut c = counter(7, &[1, 2, 3, 4]);
        let mut state = c.save().unwrap();
        let ptr = state.queue.as_ptr();
        c.queue.truncate(2);
        c.save_into(&mut state).unwrap();
        assert_eq!(state.queue, [1, 2]);
        assert_eq!(state.queue.as_ptr(), ptr);
    }

    #[test]
    fn restore_validates_untrusted_state() {
        let state = CounterState {
            value: 1,
            queue: vec![0; 9],
        };
        let mut c = counter(0, &[]);
        let err = c.restore(&state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "counter queue holds 9 bytes, more than the device's 8"
        );
    }
}
