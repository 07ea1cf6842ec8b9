//! CBOR (RFC 8949) encoding through serde and ciborium, with limits that are
//! checked before anything is allocated.
//!
//! Decoding is two passes. [`check_limits`] walks the raw bytes once without
//! allocating and refuses input that is too large, nested too deeply, declares
//! more elements than allowed (or than the remaining bytes could hold), uses
//! indefinite lengths or tags, is truncated, or has bytes after its one item.
//! Only then does ciborium build the value, so a hostile length prefix can
//! never make us reserve memory the input does not back.

use serde::Serialize;

use crate::manifest::ValidationError;
use serde::de::DeserializeOwned;

/// Bounds a decoder enforces on untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted input, in bytes.
    pub max_bytes: usize,
    /// Deepest accepted nesting of arrays and maps (the top level counts 1).
    pub max_depth: usize,
    /// Most array elements plus map entries (a map entry counts 2) in total.
    pub max_elements: usize,
}

impl DecodeLimits {
    /// Limits for signed manifests and rosters: a model of a billion f32
    /// parameters in 256 KiB chunks names about 16,000 chunks (≈ 560 KB), so
    /// 4 MiB leaves room without letting a peer make us parse gigabytes.
    pub const MANIFEST: DecodeLimits = DecodeLimits {
        max_bytes: 4 << 20,
        max_depth: 16,
        max_elements: 1 << 20,
    };

    /// Limits for request-response messages that carry one chunk (chunks are
    /// at most [`crate::MAX_CHUNK_SIZE`]).
    pub const FETCH: DecodeLimits = DecodeLimits {
        max_bytes: crate::MAX_CHUNK_SIZE + (64 << 10),
        max_depth: 8,
        max_elements: 1 << 16,
    };
}

/// Why bytes could not be decoded into a message. Every case is a property of
/// the input, never a bug, so a node can count it against the sender.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The input is larger than the limit for this kind of message.
    #[error("input of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input ends in the middle of an item (or a length prefix claims
    /// more bytes than there are).
    #[error("input is truncated")]
    Truncated,
    /// The input holds bytes after its one top-level item.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// Arrays and maps are nested deeper than the limit.
    #[error("nesting deeper than {0}")]
    TooDeep(usize),
    /// More elements than the limit.
    #[error("more than {0} elements")]
    TooManyElements(usize),
    /// Not well-formed CBOR, or a CBOR feature Tapestry does not use
    /// (indefinite lengths, tags, reserved values).
    #[error("malformed CBOR: {0}")]
    Malformed(&'static str),
    /// Well-formed CBOR that does not have the message's shape (missing or
    /// unknown field, wrong type, wrong length of a fixed-size id...).
    #[error("does not match the message schema: {0}")]
    Schema(String),
    /// A signed envelope of another kind of message than the one expected.
    #[error("expected a {expected} message, found {found:?}")]
    WrongKind {
        /// The domain tag expected.
        expected: &'static str,
        /// The domain tag found (truncated to 64 characters).
        found: String,
    },
    /// The signer's public key is not a valid ed25519 point, or is a weak
    /// (small-order) key.
    #[error("the signer's public key is invalid")]
    InvalidKey,
    /// The signature does not verify (forged, or the body or tag was altered).
    #[error("signature verification failed")]
    BadSignature,
    /// The signature is valid but the message is not acceptable on its own
    /// terms (for example its author is not its signer, or its tensor layout
    /// contradicts itself).
    #[error("invalid message: {0}")]
    Invalid(Box<ValidationError>),
    /// Well-formed and of the right shape, but not in the one encoding the
    /// protocol allows (a number or length not in its shortest form, fields
    /// out of order, an extra element...). Refused so that one signed
    /// message has exactly one content id.
    #[error("not in canonical form: {0}")]
    NotCanonical(&'static str),
}

impl From<ValidationError> for DecodeError {
    fn from(e: ValidationError) -> Self {
        DecodeError::Invalid(Box::new(e))
    }
}

/// Why a value could not be encoded (or signed).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// The CBOR encoder failed. Encoding our own types into memory cannot
    /// fail in practice; the case exists so that nothing needs `unwrap`.
    #[error("CBOR encoding failed: {0}")]
    Cbor(String),
    /// A message to be signed does not pass its own validation.
    #[error("{0}")]
    Invalid(Box<ValidationError>),
}

impl From<ValidationError> for EncodeError {
    fn from(e: ValidationError) -> Self {
        EncodeError::Invalid(Box::new(e))
    }
}

/// Encodes a value as CBOR.
pub fn to_cbor<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| EncodeError::Cbor(e.to_string()))?;
    Ok(out)
}

/// Decodes one CBOR item into `T` after [`check_limits`] has accepted it.
pub fn from_cbor<T: DeserializeOwned>(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<T, DecodeError> {
    check_limits(bytes, limits)?;
    ciborium::de::from_reader_with_recursion_limit(bytes, limits.max_depth + 1).map_err(|e| match e
    {
        ciborium::de::Error::Io(_) => DecodeError::Truncated,
        ciborium::de::Error::Syntax(_) => DecodeError::Malformed("syntax error"),
        ciborium::de::Error::Semantic(_, msg) => DecodeError::Schema(msg),
        ciborium::de::Error::RecursionLimitExceeded => DecodeError::TooDeep(limits.max_depth),
    })
}

/// Reads an item head: (major type, argument, header length). For byte and
/// text strings the argument is the payload length; for arrays and maps the
/// element count.
fn read_head(bytes: &[u8], pos: usize) -> Result<(u8, u64, usize), DecodeError> {
    let first = *bytes.get(pos).ok_or(DecodeError::Truncated)?;
    let major = first >> 5;
    let info = first & 0x1f;
    let (arg, extra) = match info {
        0..=23 => (u64::from(info), 0),
        24..=27 => {
            let n = 1usize << (info - 24);
            let end = pos.checked_add(1 + n).ok_or(DecodeError::Truncated)?;
            let raw = bytes.get(pos + 1..end).ok_or(DecodeError::Truncated)?;
            (
                raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
                n,
            )
        }
        28..=30 => return Err(DecodeError::Malformed("reserved additional information")),
        _ => {
            return Err(DecodeError::Malformed(
                "indefinite-length items are not accepted",
            ));
        }
    };
    Ok((major, arg, 1 + extra))
}

/// Walks one CBOR item over the whole of `bytes` without allocating, and
/// checks it against `limits` (see the module docs).
pub fn check_limits(bytes: &[u8], limits: &DecodeLimits) -> Result<(), DecodeError> {
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: limits.max_bytes,
        });
    }
    // Items still expected at each open nesting level; depth is its length.
    // Bounded by max_depth, so this small allocation is not peer-controlled.
    let mut pending: Vec<u64> = Vec::with_capacity(limits.max_depth.min(64));
    let mut pos = 0usize;
    let mut elements = 0u64;
    let mut remaining_top = 1u64;
    loop {
        // Pop every container that has all its items.
        while let Some(&0) = pending.last() {
            pending.pop();
        }
        match pending.last_mut() {
            Some(n) => *n -= 1,
            None if remaining_top == 0 => break,
            None => remaining_top = 0,
        }
        let (major, arg, head) = read_head(bytes, pos)?;
        pos += head;
        let left = (bytes.len() - pos) as u64;
        match major {
            0 | 1 => {}
            2 | 3 => {
                if arg > left {
                    return Err(DecodeError::Truncated);
                }
                pos += arg as usize;
            }
            4 | 5 => {
                let items = if major == 5 {
                    arg.checked_mul(2).ok_or(DecodeError::Truncated)?
                } else {
                    arg
                };
                // Every item takes at least one byte.
                if items > left {
                    return Err(DecodeError::Truncated);
                }
                elements += items;
                if elements > limits.max_elements as u64 {
                    return Err(DecodeError::TooManyElements(limits.max_elements));
                }
                if pending.len() + 1 > limits.max_depth {
                    return Err(DecodeError::TooDeep(limits.max_depth));
                }
                pending.push(items);
            }
            6 => return Err(DecodeError::Malformed("tags are not accepted")),
            _ => match head {
                // Simple values 0..=23 (false, true, null, undefined...) and
                // half, single and double floats. A one-byte simple value
                // (info 24) below 32 is not well-formed (RFC 8949 §3.3).
                1 => {}
                2 if arg >= 32 => {}
                2 => return Err(DecodeError::Malformed("invalid simple value")),
                _ => {}
            },
        }
    }
    if pos != bytes.len() {
        return Err(DecodeError::TrailingBytes(bytes.len() - pos));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: DecodeLimits = DecodeLimits {
        max_bytes: 1024,
        max_depth: 4,
        max_elements: 16,
    };

    #[test]
    fn accepts_what_it_encodes() {
        let v: (u32, Vec<u8>, String, Vec<u16>) = (7, vec![1, 2, 3], "hi".into(), vec![1, 2]);
        let bytes = to_cbor(&v).unwrap();
        let back: (u32, Vec<u8>, String, Vec<u16>) = from_cbor(&bytes, &SMALL).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn refuses_hostile_shapes() {
        // A byte string claiming 2^63 bytes.
        let huge = [0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(check_limits(&huge, &SMALL), Err(DecodeError::Truncated));
        // An array claiming 2^32 elements with nothing behind it.
        let arr = [0x9a, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(check_limits(&arr, &SMALL), Err(DecodeError::Truncated));
        // Too many elements in total.
        let many = to_cbor(&[1u8; 17].to_vec()).unwrap();
        // serde encodes Vec<u8> as an array of integers.
        assert_eq!(
            check_limits(&many, &SMALL),
            Err(DecodeError::TooManyElements(16))
        );
        // Five nested arrays.
        let deep = [0x81, 0x81, 0x81, 0x81, 0x81, 0x00];
        assert_eq!(check_limits(&deep, &SMALL), Err(DecodeError::TooDeep(4)));
        // Indefinite-length array, tag, reserved info.
        assert!(matches!(
            check_limits(&[0x9f, 0xff], &SMALL),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            check_limits(&[0xc1, 0x00], &SMALL),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            check_limits(&[0x1c], &SMALL),
            Err(DecodeError::Malformed(_))
        ));
        // Trailing bytes and empty input.
        assert_eq!(
            check_limits(&[0x01, 0x02], &SMALL),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(check_limits(&[], &SMALL), Err(DecodeError::Truncated));
        // Oversized input.
        assert!(matches!(
            check_limits(&vec![0u8; 2000], &SMALL),
            Err(DecodeError::TooLarge {
                len: 2000,
                max: 1024
            })
        ));
    }

    #[test]
    fn maps_and_nesting_at_the_limit_pass() {
        // {1: [[[0]]]}: depth 4 (map, array, array, array).
        let ok = [0xa1, 0x01, 0x81, 0x81, 0x81, 0x00];
        assert_eq!(check_limits(&ok, &SMALL), Ok(()));
    }
}
