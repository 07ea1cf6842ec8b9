//! Identifiers: [`ContentId`] (BLAKE3 of bytes) and [`NodeId`] (an ed25519
//! public key). Both are 32 bytes, shown as lowercase hex, and travel in CBOR
//! as 32-byte byte strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a hex string could not be parsed into a 32-byte id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    /// The string was not 64 characters long.
    #[error("expected 64 hex characters, got {0}")]
    Length(usize),
    /// The string had a character outside `0-9a-f` (uppercase is refused so
    /// that every id has exactly one spelling).
    #[error("not lowercase hex: {0:?}")]
    NotHex(String),
}

fn parse_hex32(s: &str) -> Result<[u8; 32], ParseIdError> {
    if s.len() != 64 {
        return Err(ParseIdError::Length(s.len()));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ParseIdError::NotHex(s.to_owned()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError::NotHex(s.to_owned()))?;
    Ok(out)
}

macro_rules! id32 {
    ($name:ident, $expecting:literal) => {
        impl $name {
            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Builds the id from raw bytes (no check is possible or needed).
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// Lowercase hex of all 32 bytes.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 8 hex characters, for logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<$name, E> {
                        <[u8; 32]>::try_from(v)
                            .map($name)
                            .map_err(|_| E::invalid_length(v.len(), &self))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    };
}

/// The BLAKE3 hash of some bytes: the address of a chunk, and the id of any
/// encoded message (a signed manifest's id is the hash of its envelope bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId([u8; 32]);

impl ContentId {
    /// Hashes `bytes` with BLAKE3.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Re-hashes `bytes` and says whether they are the content this id names.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        // blake3::Hash compares in constant time; not needed here, but free.
        blake3::Hash::from_bytes(self.0) == blake3::hash(bytes)
    }
}

id32!(ContentId, "a 32-byte BLAKE3 content id");

/// A node's identity: its 32-byte ed25519 public key. Anyone can check a
/// signature against it; it is also how peers, rosters and lineage name a node.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub(crate) [u8; 32]);

id32!(NodeId, "a 32-byte ed25519 public key");

/// Serde helper for lists of 32-byte ids (`#[serde(with = "id_list")]`): the
/// list travels as one byte string of 32·k bytes rather than an array of k
/// byte strings, so decoding a manifest that names thousands of chunks is a
/// copy, not thousands of parser calls.
pub mod id_list {
    use serde::{Deserializer, Serializer};

    /// A 32-byte id that can live in an [`id_list`](self).
    pub trait Id32: Sized {
        /// The raw bytes.
        fn raw(&self) -> &[u8; 32];
        /// From raw bytes.
        fn from_raw(bytes: [u8; 32]) -> Self;
    }

    impl Id32 for super::ContentId {
        fn raw(&self) -> &[u8; 32] {
            &self.0
        }
        fn from_raw(bytes: [u8; 32]) -> Self {
            Self(bytes)
        }
    }

    impl Id32 for super::NodeId {
        fn raw(&self) -> &[u8; 32] {
            &self.0
        }
        fn from_raw(bytes: [u8; 32]) -> Self {
            Self(bytes)
        }
    }

    /// Serializes the ids as one concatenated byte string.
    pub fn serialize<T: Id32, S: Serializer>(ids: &[T], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            bytes.extend_from_slice(id.raw());
        }
        s.serialize_bytes(&bytes)
    }

    /// Deserializes a byte string whose length is a multiple of 32.
    pub fn deserialize<'de, T: Id32, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        let bytes: serde_bytes::ByteBuf = serde::Deserialize::deserialize(d)?;
        if !bytes.len().is_multiple_of(32) {
            return Err(serde::de::Error::invalid_length(
                bytes.len(),
                &"a list of 32-byte ids (a multiple of 32 bytes)",
            ));
        }
        Ok(bytes
            .chunks_exact(32)
            .map(|c| {
                let mut id = [0u8; 32];
                id.copy_from_slice(c);
                T::from_raw(id)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_id_hex_round_trip_and_known_value() {
        // BLAKE3 of the empty input, from the BLAKE3 specification's test vectors.
        let id = ContentId::of(b"");
        assert_eq!(
            id.to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(id.short(), "af1349b9");
        assert_eq!(id.to_hex().parse::<ContentId>().unwrap(), id);
        assert!(id.matches(b""));
        assert!(!id.matches(b"x"));
    }

    #[test]
    fn parse_rejects_bad_hex() {
        assert_eq!("ab".parse::<ContentId>(), Err(ParseIdError::Length(2)));
        let upper = "AF1349B9F5F9A1A6A0404DEA36DCC9499BCB25C9ADC112B7CC9A93CAE41F3262";
        assert!(matches!(
            upper.parse::<ContentId>(),
            Err(ParseIdError::NotHex(_))
        ));
        let bad = "zz1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
        assert!(matches!(
            bad.parse::<NodeId>(),
            Err(ParseIdError::NotHex(_))
        ));
    }
}
