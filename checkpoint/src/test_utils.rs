//! Test helpers for every crate that has states (enable feature `test-utils` in
//! `[dev-dependencies]`): one generic round-trip check applied to every
//! component that implements [`Persist`], through the
//! [`persist_roundtrip_tests!`](crate::persist_roundtrip_tests) macro (in the
//! spirit of crosvm's `suspendable_tests!`).

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode_state, encode_state, DEFAULT_STATE_LIMIT};
use crate::persist::Persist;

/// A component to test, and a second one of the same shape, with its own host
/// resources, to restore its state into (as a standby restores into the
/// machine it built).
pub trait PersistPair {
    /// The component under test.
    type Component: Persist;

    /// The component to save (in a state worth saving, not its reset state)
    /// and the one to restore into.
    fn pair(&mut self) -> (&mut Self::Component, &mut Self::Component);

    /// Clears the parts of a state that legitimately differ between two saves
    /// of equal components (host clocks that run on while the test runs).
    fn normalize(_state: &mut <Self::Component as Persist>::State) {}
}

/// Generates one `#[test]` per component: each runs
/// [`check_persist_roundtrip`] on the [`PersistPair`] its expression builds.
///
/// ```ignore
/// persist_roundtrip_tests! {
///     serial: SerialPair::new();
///     virtio_net: NetPair::after_traffic();
/// }
/// ```
#[macro_export]
macro_rules! persist_roundtrip_tests {
    ($($(#[$meta:meta])* $name:ident: $pair:expr;)+) => {
        $(
            $(#[$meta])*
            #[test]
            fn $name() {
                let mut pair = $pair;
                $crate::test_utils::check_persist_roundtrip(&mut pair);
            }
        )+
    };
}

/// The generic round trip: save → encode → decode → restore into the second
/// component → save is equal (after [`PersistPair::normalize`]). It also
/// checks the encoding itself ([`assert_roundtrip`]) and that saving into a
/// state that already holds another one overwrites all of it.
pub fn check_persist_roundtrip<P: PersistPair>(pair: &mut P)
where
    <P::Component as Persist>::State: Debug,
{
    let (original, target) = pair.pair();
    let mut saved = original.save().expect("saving the original failed");
    let bytes = assert_roundtrip(&saved);
    let decoded: <P::Component as Persist>::State =
        decode_state(&bytes, DEFAULT_STATE_LIMIT).expect("state must decode");
    if let Err(e) = target.restore(&decoded) {
        panic!("restoring a saved state failed: {e}");
    }
    let mut again = target.save().expect("saving the restored component failed");
    let mut reused = decoded;
    target
        .save_into(&mut reused)
        .expect("saving the restored component failed");
    P::normalize(&mut saved);
    P::normalize(&mut again);
    P::normalize(&mut reused);
    assert_same(&saved, &again, "save after restore differs");
    assert_same(&again, &reused, "saving into a used state differs");
}

/// Asserts that `state` survives encode → decode (the decoded state encodes
/// to the same bytes), and that strict prefixes of its encoding fail to decode
/// (a torn state is never mistaken for a valid one). Returns the encoding.
pub fn assert_roundtrip<T: Serialize + DeserializeOwned>(state: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_state(state, &mut bytes).expect("state must encode");
    let back: T = decode_state(&bytes, DEFAULT_STATE_LIMIT).expect("state must decode");
    let mut again = Vec::new();
    encode_state(&back, &mut again).expect("decoded state must encode");
    assert!(bytes == again, "state changed across encode/decode");
    // Every strict prefix for small states; about 256 spread prefixes (and the
    // last 16) for big ones, so the check stays linear-ish.
    let len = bytes.len();
    let step = (len / 256).max(1);
    let prefixes = (0..len).step_by(step).chain(len.saturating_sub(16)..len);
    for n in prefixes {
        assert!(
            decode_state::<T>(&bytes[..n], DEFAULT_STATE_LIMIT).is_err(),
            "a {n}-byte prefix of a {len}-byte state decoded"
        );
    }
    bytes
}

/// Panics with `what` and the differing lines of the two states' debug
/// forms unless they encode to the same bytes.
fn assert_same<T: Serialize + Debug>(left: &T, right: &T, what: &str) {
    let (mut l, mut r) = (Vec::new(), Vec::new());
    encode_state(left, &mut l).expect("state must encode");
    encode_state(right, &mut r).expect("state must encode");
    if l == r {
        return;
    }
    let (ld, rd) = (format!("{left:#?}"), format!("{right:#?}"));
    let diff: Vec<String> = ld
        .lines()
        .zip(rd.lines())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .take(20)
        .map(|(i, (a, b))| format!("line {i}:\n  - {}\n  + {}", a.trim(), b.trim()))
        .collect();
    let diff = if diff.is_empty() {
        format!("left:\n{ld}\nright:\n{rd}")
    } else {
        diff.join("\n")
    };
    panic!(
        "{what} ({} vs {} bytes encoded); first differences:\n{}",
        l.len(),
        r.len(),
        diff
    );
}
