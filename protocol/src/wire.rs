//! Request-response messages for fetching chunks, signed manifests and a
//! peer's head model version. They are not signed: a chunk is checked against
//! the BLAKE3 id it was asked for, a manifest against its signature and id,
//! a head claim is only a hint to fetch and verify a manifest, and an
//! attestation is a signed manifest of its own.

use serde::{Deserialize, Serialize};

use crate::cbor::{DecodeError, DecodeLimits, EncodeError, from_cbor, to_cbor};
use crate::id::ContentId;

/// What one peer asks another for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum FetchRequest {
    /// A chunk by its BLAKE3 id.
    Chunk(ContentId),
    /// A signed manifest (delta or model) by the id of its envelope.
    SignedManifest(ContentId),
    /// The peer's current head model version of a model in a region.
    Head {
        /// The model.
        model_id: String,
        /// The region.
        region: String,
    },
    /// The peer's attestation of a model version (by its manifest's id):
    /// the version's manifest re-signed by the peer, if the peer verified
    /// it; answered with [`FetchResponse::SignedManifest`] or
    /// [`FetchResponse::NotFound`].
    Attest(ContentId),
    /// The version of a model in a region that the peer's region agreed on
    /// for a round of a mix of regions: the plain version (one parent) of
    /// that round the peer adopted, asked by members of neighbouring
    /// regions. Answered with [`FetchResponse::Head`] (`None`: the peer
    /// adopted none of that round, or no longer holds it) or
    /// [`FetchResponse::NotFound`] (another model or region). A hint, like
    /// a head: the asker checks the version on its region's attestations.
    MixHead {
        /// The model.
        model_id: String,
        /// The region.
        region: String,
        /// The mix round.
        round: u64,
    },
}

/// The answer to a [`FetchRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FetchResponse {
    /// The chunk's bytes (to be checked against the id asked for).
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The signed envelope's bytes (to be verified and hashed).
    SignedManifest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The id of the peer's head model manifest, if it has one.
    Head(Option<ContentId>),
    /// The peer does not have it.
    NotFound,
    /// The peer is overloaded; ask again later or elsewhere.
    Busy,
}

macro_rules! wire_codec {
    ($t:ty) => {
        impl $t {
            /// Encodes as CBOR.
            pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
                to_cbor(self)
            }
            /// Decodes untrusted bytes within [`DecodeLimits::FETCH`].
            pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
                from_cbor(bytes, &DecodeLimits::FETCH)
            }
        }
    };
}

wire_codec!(FetchRequest);
wire_codec!(FetchResponse);
