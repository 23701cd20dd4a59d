//! Save/restore of components (Firecracker's `Persist`, in the spirit of crosvm's
//! `Suspendable`).
//!
//! Every component with state that must survive a failover has a plain-data
//! `<Thing>State` (no fds, no `Arc`s; host resources are named, not held) and implements
//! [`Persist`]. States compose upward: device → device manager → VM. The VM's state is
//! encoded with [`crate::codec::encode_state`] once per epoch and staged after the dirty
//! pages.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose state can be saved into a plain-data value and rebuilt from one.
///
/// `restore` receives the state as read from the wire: it is untrusted and must be
/// validated (queue sizes, indices, lengths) with a typed error, never a panic.
pub trait Persist<'a>: Sized {
    /// The plain-data state (serde-serializable, no host resources).
    type State: Serialize + DeserializeOwned;
    /// What restoring needs besides the state: host resources, guest memory, event fds.
    type ConstructorArgs;
    /// Why a state could not be restored.
    type Error: std::error::Error;

    /// Captures the component's state. Called only while the component is quiescent (I4).
    fn save(&self) -> Self::State;

    /// Rebuilds a component from `state` and the host resources in `args`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{assert_persist_roundtrip, assert_roundtrip};
    use serde::Deserialize;

    /// A toy device: a counter with a bounded queue.
    #[derive(Debug)]
    struct Counter {
        value: u64,
        queue: Vec<u8>,
        max_queue: usize,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

    impl Persist<'_> for Counter {
        type State = CounterState;
        type ConstructorArgs = usize;
        type Error = CounterError;

        fn save(&self) -> CounterState {
            CounterState {
                value: self.value,
                queue: self.queue.clone(),
            }
        }

        fn restore(max_queue: usize, state: &CounterState) -> Result<Self, CounterError> {
            if state.queue.len() > max_queue {
                return Err(CounterError {
                    len: state.queue.len(),
                    max: max_queue,
                });
            }
            Ok(Counter {
                value: state.value,
                queue: state.queue.clone(),
                max_queue,
            })
        }
    }

    #[test]
    fn counter_roundtrips() {
        let c = Counter {
            value: 42,
            queue: vec![1, 2, 3],
            max_queue: 8,
        };
        assert_roundtrip(&c.save());
        assert_persist_roundtrip(&c, || c.max_queue);
    }

    #[test]
    fn restore_validates_untrusted_state() {
        let state = CounterState {
            value: 1,
            queue: vec![0; 9],
        };
        let err = Counter::restore(8, &state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "counter queue holds 9 bytes, more than the device's 8"
        );
    }
}
