//! Tapestry's wire protocol: everything two nodes must agree on, and nothing
//! that does IO (no tokio, no sockets, no clock; randomness only from an RNG
//! the caller passes in).
//!
//! - [`id`]: [`ContentId`] (BLAKE3 of bytes) and [`NodeId`] (ed25519 public key).
//! - [`identity`]: [`Keypair`] and its 0600 key file.
//! - [`cbor`]: CBOR through serde, with [`DecodeLimits`] checked before allocating.
//! - [`signed`]: [`Signed<T>`] envelopes, domain-separated and strictly verified.
//! - [`manifest`]: [`DeltaManifest`], [`ModelManifest`], [`Roster`].
//! - [`wire`]: [`FetchRequest`] / [`FetchResponse`] for chunk and manifest fetches.
//! - [`codec`]: delta codecs (f32, bf16, int8 blockwise, top-k) and [`ErrorFeedback`].
//!
//! The byte formats are specified in `protocol/README.md`, with golden
//! vectors in `protocol/tests/vectors/`.

pub mod cbor;
pub mod codec;
pub mod id;
pub mod identity;
pub mod manifest;
pub mod signed;
pub mod wire;

pub use cbor::{DecodeError, DecodeLimits, EncodeError};
pub use codec::{
    Codec, CodecError, ErrorFeedback, TOPK_INT8_BLOCK, f32_from_le_bytes, f32_le_bytes,
    write_f32_le,
};
pub use id::{ContentId, NodeId, ParseIdError};
pub use identity::{KeyFileError, Keypair};
pub use manifest::{
    DEFAULT_CHUNK_SIZE, DType, DeltaManifest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ModelManifest,
    Roster, TensorSpec, ValidationError,
};
pub use signed::{Signed, SignedMessage, Verified, verify_batch};
pub use wire::{FetchRequest, FetchResponse};
