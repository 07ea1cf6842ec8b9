//! Signed envelopes: `Signed<T>` carries the encoded body bytes of a message,
//! the signer's public key and an Ed25519 signature.
//!
//! The signature covers `BLAKE3(domain_tag || body)`, a 32-byte digest, so
//! signing and verifying cost the same for a tiny roster and a manifest naming
//! thousands of chunks, and a signature made for one kind of message (one
//! tag) never verifies as another. Tags are ASCII and prefix-free, so the
//! concatenation is unambiguous.
//!
//! On the wire an envelope is the CBOR array
//! `[tag: text, body: bytes, signer: bytes(32), signature: bytes(64)]`.
//! The id of a signed message is the BLAKE3 hash of those envelope bytes.
//!
//! Decoding checks, in this order: size and shape limits, the tag, that the
//! envelope is in its one canonical encoding, the key, the signature
//! (strict: `verify_strict`, which rejects small-order keys and `R` values
//! and non-canonical `s`), and only then decodes the body, checks that it
//! too is canonical, and runs the message's own validation. Nothing
//! unverified is ever returned as `T`.

use std::marker::PhantomData;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cbor::{DecodeError, DecodeLimits, EncodeError, from_cbor, to_cbor};
use crate::id::{ContentId, NodeId};
use crate::identity::Keypair;
use crate::manifest::ValidationError;

/// A message kind that travels signed. Each kind has its own domain tag.
pub trait SignedMessage: Serialize + DeserializeOwned {
    /// The ASCII domain tag mixed into the signed digest.
    const DOMAIN_TAG: &'static str;

    /// Limits for the whole envelope of this kind.
    const LIMITS: DecodeLimits = DecodeLimits::MANIFEST;

    /// Checks the message on its own terms once its signature is known good,
    /// e.g. that an author field names the signer. Returns why not.
    fn validate(&self, signer: &NodeId) -> Result<(), ValidationError>;
}

/// The digest that is signed: BLAKE3 over the domain tag, then the body.
pub fn signing_digest(domain_tag: &str, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(domain_tag.as_bytes());
    h.update(body);
    *h.finalize().as_bytes()
}

#[derive(Serialize, Deserialize)]
struct Envelope(
    String,
    #[serde(with = "serde_bytes")] Vec<u8>,
    NodeId,
    #[serde(with = "serde_bytes")] Vec<u8>,
);

/// A parsed envelope whose signature has **not** been checked yet. Get one
/// from [`Signed::parse`] to verify many at once with [`verify_batch`];
/// otherwise use [`Signed::open`].
pub struct Signed<T> {
    bytes: Vec<u8>,
    body: Vec<u8>,
    signer: NodeId,
    signature: [u8; 64],
    kind: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("signer", &self.signer)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// A message whose envelope was verified and whose body was decoded and
/// validated. It keeps the envelope bytes exactly as received, so it can be
/// stored, re-served and re-verified by others.
#[derive(Debug, Clone)]
pub struct Verified<T> {
    bytes: Vec<u8>,
    id: ContentId,
    signer: NodeId,
    message: T,
}

impl<T> Verified<T> {
    /// The decoded message.
    pub fn message(&self) -> &T {
        &self.message
    }
    /// Who signed it.
    pub fn signer(&self) -> NodeId {
        self.signer
    }
    /// BLAKE3 of the envelope bytes: the id others use to refer to it.
    pub fn id(&self) -> ContentId {
        self.id
    }
    /// The envelope bytes as signed (or as received).
    pub fn envelope_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Gives up the wrapper: envelope bytes and message.
    pub fn into_parts(self) -> (Vec<u8>, T) {
        (self.bytes, self.message)
    }
}

impl<T: SignedMessage> Signed<T> {
    /// Encodes `message`, signs it with `key`, and returns it verified.
    /// The message must pass its own validation with `key` as the signer.
    pub fn sign(message: T, key: &Keypair) -> Result<Verified<T>, EncodeError> {
        let signer = key.node_id();
        message.validate(&signer)?;
        let body = to_cbor(&message)?;
        let signature = key.sign_digest(&signing_digest(T::DOMAIN_TAG, &body));
        let bytes = to_cbor(&Envelope(
            T::DOMAIN_TAG.to_owned(),
            body,
            signer,
            signature.to_vec(),
        ))?;
        Ok(Verified {
            id: ContentId::of(&bytes),
            bytes,
            signer,
            message,
        })
    }

    /// Decodes and fully verifies envelope bytes.
    pub fn open(bytes: &[u8]) -> Result<Verified<T>, DecodeError> {
        Self::parse(bytes.to_vec())?.verify()
    }

    /// Decodes and validates the message of envelope bytes **without
    /// checking the signature**, and returns only the message (never a
    /// [`Verified`]). Only for bytes this process verified before and kept
    /// under their content id — its own store, whose reads check the id —
    /// where checking the signature again costs a verification per read
    /// and proves nothing new. Anything from a peer goes through
    /// [`Signed::open`].
    pub fn decode_stored(bytes: &[u8]) -> Result<T, DecodeError> {
        let Envelope(tag, body, signer, _) = from_cbor(bytes, &T::LIMITS)?;
        if tag != T::DOMAIN_TAG {
            return Err(DecodeError::WrongKind {
                expected: T::DOMAIN_TAG,
                found: tag.chars().take(64).collect(),
            });
        }
        let message: T = from_cbor(&body, &T::LIMITS)?;
        message.validate(&signer)?;
        Ok(message)
    }

    /// Parses an envelope and checks its limits and tag, but not its
    /// signature: the result is only good for [`Signed::verify`] or
    /// [`verify_batch`].
    pub fn parse(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        let Envelope(tag, body, signer, signature) = from_cbor(&bytes, &T::LIMITS)?;
        if tag != T::DOMAIN_TAG {
            return Err(DecodeError::WrongKind {
                expected: T::DOMAIN_TAG,
                found: tag.chars().take(64).collect(),
            });
        }
        // The id is the hash of these bytes: only the one encoding the
        // protocol allows is taken, or a third party could re-wrap a
        // signed message under a new id without touching its signature.
        let canonical = to_cbor(&(
            tag.as_str(),
            serde_bytes::Bytes::new(&body),
            &signer,
            serde_bytes::Bytes::new(&signature),
        ))
        .map_err(|_| DecodeError::NotCanonical("the envelope does not re-encode"))?;
        if canonical != bytes {
            return Err(DecodeError::NotCanonical("envelope"));
        }
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| DecodeError::Schema("a signature must be 64 bytes".into()))?;
        Ok(Self {
            bytes,
            body,
            signer,
            signature,
            kind: PhantomData,
        })
    }

    /// Who claims to have signed it (not yet checked).
    pub fn claimed_signer(&self) -> NodeId {
        self.signer
    }

    fn key(&self) -> Result<VerifyingKey, DecodeError> {
        let key = self.signer.verifying_key().ok_or(DecodeError::InvalidKey)?;
        if key.is_weak() {
            return Err(DecodeError::InvalidKey);
        }
        Ok(key)
    }

    /// Checks the signature strictly, then decodes and validates the body.
    pub fn verify(self) -> Result<Verified<T>, DecodeError> {
        let key = self.key()?;
        let digest = signing_digest(T::DOMAIN_TAG, &self.body);
        key.verify_strict(&digest, &Signature::from_bytes(&self.signature))
            .map_err(|_| DecodeError::BadSignature)?;
        self.decode_body()
    }

    fn decode_body(self) -> Result<Verified<T>, DecodeError> {
        let message: T = from_cbor(&self.body, &T::LIMITS)?;
        // The signer chose these bytes, but one message still has one
        // encoding: what a receiver takes is what it would have signed.
        if to_cbor(&message).ok().as_deref() != Some(self.body.as_slice()) {
            return Err(DecodeError::NotCanonical("body"));
        }
        message.validate(&self.signer)?;
        Ok(Verified {
            id: ContentId::of(&self.bytes),
            bytes: self.bytes,
            signer: self.signer,
            message,
        })
    }
}

/// The y-coordinates (sign bit cleared) of the eight small-order points'
/// canonical encodings: 0, 1, p − 1, and the two of order 8. The same list
/// libsodium refuses.
const SMALL_ORDER_Y: [[u8; 32]; 5] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
];

/// Whether the `R` half of a signature passes `verify_strict`'s own checks:
/// a canonical encoding (y < 2^255 − 19) of a point that is not of small
/// order. Table look-ups only: no point decompression, which batch
/// verification does anyway.
fn r_is_strict(signature: &[u8; 64]) -> bool {
    let mut y = [0u8; 32];
    y.copy_from_slice(&signature[..32]);
    y[31] &= 0x7f;
    let canonical = y[31] != 0x7f || y[1..31].iter().any(|b| *b != 0xff) || y[0] < 0xed;
    canonical && !SMALL_ORDER_Y.contains(&y)
}

/// Verifies many envelopes of one kind together. Ed25519 batch verification
/// checks all signatures in one multi-scalar multiplication (about twice the
/// single-verify rate at 64 signatures; see BENCHMARKS.md). If the batch
/// fails, each envelope is verified on its own so that exactly the bad ones
/// are reported.
///
/// Both paths accept the same signatures: batch verification checks the same
/// cofactorless equation as `verify_strict` (as a random linear combination),
/// and before it each signature's `R` must be a canonical encoding of a point
/// that is not of small order, and each key must not be weak — exactly the
/// extra conditions `verify_strict` imposes.
pub fn verify_batch<T: SignedMessage>(
    items: Vec<Signed<T>>,
) -> Vec<Result<Verified<T>, DecodeError>> {
    let mut digests = Vec::with_capacity(items.len());
    let mut sigs = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    let mut all_keys_ok = true;
    for item in &items {
        match item.key() {
            Ok(k) => keys.push(k),
            Err(_) => {
                all_keys_ok = false;
                break;
            }
        }
        if !r_is_strict(&item.signature) {
            all_keys_ok = false;
            break;
        }
        digests.push(signing_digest(T::DOMAIN_TAG, &item.body));
        sigs.push(Signature::from_bytes(&item.signature));
    }
    if all_keys_ok && !items.is_empty() {
        let msgs: Vec<&[u8]> = digests.iter().map(|d| d.as_slice()).collect();
        if ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok() {
            return items.into_iter().map(Signed::decode_body).collect();
        }
    }
    items.into_iter().map(Signed::verify).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::edwards::CompressedEdwardsY;

    #[test]
    fn small_order_table_is_exactly_the_small_order_points() {
        // Every table entry, with either sign bit, decodes to a small-order
        // point (or, for x = 0 with the sign bit set, to nothing canonical).
        for y in SMALL_ORDER_Y {
            let p = CompressedEdwardsY(y).decompress().expect("a curve point");
            assert!(p.is_small_order());
        }
        // And every small-order point's encoding is in the table: the eight
        // torsion points are the multiples of one of order 8.
        let t = CompressedEdwardsY(SMALL_ORDER_Y[3])
            .decompress()
            .expect("a curve point");
        let mut q = curve25519_dalek::EdwardsPoint::default();
        for _ in 0..8 {
            let mut y = q.compress().to_bytes();
            y[31] &= 0x7f;
            assert!(SMALL_ORDER_Y.contains(&y), "{y:02x?}");
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&q.compress().to_bytes());
            assert!(!r_is_strict(&sig));
            q += t;
        }
        // A normal point passes.
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(
            &curve25519_dalek::constants::ED25519_BASEPOINT_POINT
                .compress()
                .to_bytes(),
        );
        assert!(r_is_strict(&sig));
    }
}
