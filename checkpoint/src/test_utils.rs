//! Test helpers for every crate that has states (enable feature `test-utils` in
//! `[dev-dependencies]`). One generic round-trip check, applied to every state type, in
//! the spirit of crosvm's `suspendable_tests!`.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode_state, encode_state, DEFAULT_STATE_LIMIT};
use crate::persist::Persist;

/// Asserts that `state` survives encode → decode unchanged, that encoding it twice gives
/// the same bytes, and that strict prefixes of its encoding fail to decode (a torn state
/// is never mistaken for a valid one).
pub fn assert_roundtrip<T>(state: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut bytes = Vec::new();
    encode_state(state, &mut bytes).expect("state must encode");
    let back: T = decode_state(&bytes, DEFAULT_STATE_LIMIT).expect("state must decode");
    assert_eq!(&back, state, "state changed across encode/decode");
    let mut again = Vec::new();
    encode_state(&back, &mut again).expect("decoded state must encode");
    assert_eq!(bytes, again, "encoding is not deterministic");
    // Every strict prefix for small states; about 256 spread prefixes (and the last 16)
    // for big ones, so the check stays linear-ish.
    let len = bytes.len();
    let step = (len / 256).max(1);
    let prefixes = (0..len).step_by(step).chain(len.saturating_sub(16)..len);
    for n in prefixes {
        assert!(
            decode_state::<T>(&bytes[..n], DEFAULT_STATE_LIMIT).is_err(),
            "a {n}-byte prefix of a {}-byte state decoded",
            bytes.len()
        );
    }
}

/// Asserts save → encode → decode → restore → save gives an equal state.
/// `args` builds the constructor arguments for the restore.
pub fn assert_persist_roundtrip<'a, T, F>(component: &T, args: F)
where
    T: Persist<'a>,
    T::State: PartialEq + Debug,
    T::Error: Debug,
    F: FnOnce() -> T::ConstructorArgs,
{
    let saved = component.save();
    assert_roundtrip(&saved);
    let mut bytes = Vec::new();
    encode_state(&saved, &mut bytes).expect("state must encode");
    let decoded: T::State = decode_state(&bytes, DEFAULT_STATE_LIMIT).expect("state must decode");
    let restored = T::restore(args(), &decoded).expect("restore of a saved state must succeed");
    assert_eq!(restored.save(), saved, "save after restore differs");
}
