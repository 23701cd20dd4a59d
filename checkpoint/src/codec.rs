//! The compact binary codec for plain-data states.
//!
//! States are encoded with bincode 1.3, fixed-width integers, little endian. Decoding
//! treats its input as untrusted: the total number of bytes it may consume is bounded by
//! a limit, every length prefix is checked against that limit (and the remaining input)
//! before anything is allocated, trailing bytes are rejected, and malformed input yields a
//! [`CodecError`], never a panic.
//!
//! Allocation while decoding is bounded by the input length plus, per nesting level of
//! sequences, serde's cautious pre-allocation of at most 1 MiB (a lying length prefix can
//! make serde reserve that much before the limit stops the read).

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The default limit for one decoded state blob: 16 MiB.
pub const DEFAULT_STATE_LIMIT: u64 = 16 << 20;

/// Errors of [`encode_state`] and [`decode_state`].
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The state could not be serialized (e.g. a sequence of unknown length).
    #[error("cannot encode state: {0}")]
    Encode(#[source] bincode::Error),
    /// The encoded state is longer than the caller's limit.
    #[error("encoded state of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Length of the input.
        len: usize,
        /// The limit it was checked against.
        limit: u64,
    },
    /// The bytes are not a valid encoding of the expected state type.
    #[error("cannot decode state from {len} bytes (limit {limit} bytes): {source}")]
    Decode {
        /// Length of the input.
        len: usize,
        /// The limit in force.
        limit: u64,
        /// What bincode found wrong.
        #[source]
        source: bincode::Error,
    },
}

fn encode_options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_no_limit()
}

fn decode_options(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit)
        .reject_trailing_bytes()
}

/// Encodes `state` into `out`, replacing its contents but reusing its capacity: once `out`
/// has grown to the size of the state, encoding allocates nothing.
pub fn encode_state<T: Serialize + ?Sized>(state: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.clear();
    encode_options()
        .serialize_into(&mut *out, state)
        .map_err(CodecError::Encode)
}

/// Appends the encoding of `state` to `out`.
pub(crate) fn encode_append<T: Serialize + ?Sized>(
    state: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_options()
        .serialize_into(&mut *out, state)
        .map_err(CodecError::Encode)
}

/// Returns the encoded size of `state` without encoding it.
pub fn encoded_len<T: Serialize + ?Sized>(state: &T) -> Result<u64, CodecError> {
    encode_options()
        .serialized_size(state)
        .map_err(CodecError::Encode)
}

/// Decodes a `T` from untrusted `bytes`, consuming at most `limit` bytes, and requiring
/// that the encoding spans `bytes` exactly.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8], limit: u64) -> Result<T, CodecError> {
    if bytes.len() as u64 > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    decode_options(limit)
        .deserialize(bytes)
        .map_err(|source| CodecError::Decode {
            len: bytes.len(),
            limit,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u32,
        name: String,
        regs: Vec<u64>,
        nested: Vec<Vec<u8>>,
        opt: Option<[u8; 6]>,
        kind: Kind,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        A,
        B(u16),
        C { x: i64 },
    }

    fn sample() -> Sample {
        Sample {
            id: 7,
            name: "virtio-net0".into(),
            regs: (0..40).collect(),
            nested: vec![vec![1, 2, 3], vec![]],
            opt: Some([2, 0, 0, 0, 0, 1]),
            kind: Kind::C { x: -5 },
        }
    }

    #[test]
    fn roundtrip_and_capacity_reuse() {
        let s = sample();
        let mut buf = Vec::new();
        encode_state(&s, &mut buf).unwrap();
        assert_eq!(buf.len() as u64, encoded_len(&s).unwrap());
        let back: Sample = decode_state(&buf, DEFAULT_STATE_LIMIT).unwrap();
        assert_eq!(back, s);
        let cap = buf.capacity();
        let ptr = buf.as_ptr();
        encode_state(&s, &mut buf).unwrap();
        assert_eq!(buf.capacity(), cap);
        assert_eq!(buf.as_ptr(), ptr);
    }

    #[test]
    fn fixed_width_integers() {
        let mut buf = Vec::new();
        encode_state(&(1u64, 2u32), &mut buf).unwrap();
        assert_eq!(buf.len(), 12);
    }

    #[test]
    fn over_limit_input_rejected() {
        let mut buf = Vec::new();
        encode_state(&sample(), &mut buf).unwrap();
        let err = decode_state::<Sample>(&buf, 10).unwrap_err();
        assert!(
            matches!(err, CodecError::TooLarge { limit: 10, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("exceeds the limit of 10 bytes"));
    }

    #[test]
    fn huge_length_prefix_rejected_without_allocation() {
        // A Vec<u8> claiming 2^62 elements in a 16-byte input.
        let mut bytes = (1u64 << 62).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        let err = decode_state::<Vec<u8>>(&bytes, 1024).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut buf = Vec::new();
        encode_state(&5u32, &mut buf).unwrap();
        buf.push(0);
        assert!(decode_state::<u32>(&buf, 64).is_err());
    }

    #[test]
    fn every_truncation_fails() {
        let mut buf = Vec::new();
        encode_state(&sample(), &mut buf).unwrap();
        for n in 0..buf.len() {
            assert!(
                decode_state::<Sample>(&buf[..n], DEFAULT_STATE_LIMIT).is_err(),
                "len {n}"
            );
        }
    }

    #[test]
    fn bad_enum_tag_and_utf8_fail() {
        let mut buf = Vec::new();
        encode_state(&Kind::B(3), &mut buf).unwrap();
        buf[0] = 9;
        assert!(decode_state::<Kind>(&buf, 64).is_err());
        let mut s = Vec::new();
        encode_state(&String::from("ab"), &mut s).unwrap();
        s[8] = 0xff;
        assert!(decode_state::<String>(&s, 64).is_err());
    }
}
