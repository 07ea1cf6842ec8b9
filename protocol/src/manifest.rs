//! The messages nodes sign: delta manifests (one node's contribution to a
//! round), model manifests (a model version and its lineage) and rosters (who
//! may speak in a permissioned region).
//!
//! Manifests are small: they name the tensor payload by the ordered BLAKE3 ids
//! of its chunks, and the chunks travel separately, each checked against its
//! id before it is stored ("small gossip, big blobs").

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::codec::{Codec, CodecError};
use crate::id::{ContentId, NodeId};
use crate::signed::SignedMessage;

/// Smallest chunk size a manifest may declare.
pub const MIN_CHUNK_SIZE: usize = 4 << 10;
/// Largest chunk size a manifest may declare.
pub const MAX_CHUNK_SIZE: usize = 4 << 20;
/// Chunk size used unless configured otherwise.
pub const DEFAULT_CHUNK_SIZE: usize = 256 << 10;
/// Most parameters a model may have (2^40, far beyond any CPU-trained model,
/// but small enough that sizes computed from it never overflow).
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the upper half of a binary32).
    Bf16,
}

/// One named tensor of a model: its name, shape and element type. A model's
/// layout is the ordered list of these; flattening the tensors in that order
/// gives the one vector that deltas and codecs work on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Name, e.g. `layer0.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Element type.
    pub dtype: DType,
}

/// Why a message whose signature is good is still not acceptable on its own
/// terms. Every case is a property of the message, never a bug.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// The tensor layout names no tensor.
    #[error("the tensor layout is empty")]
    EmptyLayout,
    /// A tensor name is empty or longer than 256 bytes.
    #[error("tensor name of {0} bytes (must be 1..=256)")]
    TensorNameLength(usize),
    /// Two tensors have the same name.
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    /// A tensor has more than 8 dimensions.
    #[error("tensor {name:?} has {dims} dimensions (at most 8)")]
    TooManyDimensions {
        /// The tensor.
        name: String,
        /// Its number of dimensions.
        dims: usize,
    },
    /// A tensor has more elements than a model may have.
    #[error("tensor {0:?} is too large")]
    TensorTooLarge(String),
    /// The tensors together have more elements than a model may have.
    #[error("the model is too large")]
    ModelTooLarge,
    /// A model id or region name is not a well-formed name.
    #[error("{what} {value:?} must be 1..=64 characters of a-z, 0-9, '-', '_', '.'")]
    BadName {
        /// Which field (`model id`, `region`).
        what: &'static str,
        /// The value found.
        value: String,
    },
    /// The manifest's author is not the envelope's signer.
    #[error("author {} is not the signer {}", author.short(), signer.short())]
    AuthorNotSigner {
        /// The author field.
        author: NodeId,
        /// The envelope's signer.
        signer: NodeId,
    },
    /// The chunk size is outside the protocol's bounds.
    #[error("chunk size {0} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(usize),
    /// The number of chunk ids does not match the payload length.
    #[error(
        "{payload_bytes} payload bytes in {chunk_size}-byte chunks make {expected} chunks, not {found}"
    )]
    ChunkCount {
        /// Payload length.
        payload_bytes: u64,
        /// Chunk size.
        chunk_size: usize,
        /// Chunks that length makes.
        expected: u64,
        /// Chunk ids listed.
        found: usize,
    },
    /// The delta's codec parameters are out of range.
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// The delta's element count cannot be encoded with its codec.
    #[error("the delta is too large for this codec")]
    TooLargeForCodec,
    /// The delta's payload length is not what its codec and layout imply.
    #[error("a {elements}-element delta in {codec} takes {expected} bytes, not {found}")]
    DeltaPayload {
        /// Elements in the layout.
        elements: u64,
        /// The codec.
        codec: Codec,
        /// Bytes the codec takes for them.
        expected: u64,
        /// Bytes the manifest claims.
        found: u64,
    },
    /// A delta claims to come from no training sample.
    #[error("sample count is zero")]
    ZeroSamples,
    /// A delta's norm is negative, NaN or infinite.
    #[error("L2 norm {0} is not a finite non-negative number")]
    BadNorm(f32),
    /// A model tensor is not f32.
    #[error("model tensor {0:?} is not f32")]
    NotF32(String),
    /// A model's payload length is not four bytes per parameter.
    #[error("{elements} f32 parameters take {} bytes, not {found}", elements * 4)]
    ModelPayload {
        /// Parameters in the layout.
        elements: u64,
        /// Bytes the manifest claims.
        found: u64,
    },
    /// A model version names more than 256 parents.
    #[error("{0} parents (at most 256)")]
    TooManyParents(usize),
    /// A roster's members are not sorted and unique.
    #[error("roster members must be sorted and unique")]
    UnsortedRoster,
}

/// Checks a layout and returns its total number of elements.
pub fn layout_elements(layout: &[TensorSpec]) -> Result<u64, ValidationError> {
    if layout.is_empty() {
        return Err(ValidationError::EmptyLayout);
    }
    let mut names = BTreeSet::new();
    let mut total = 0u64;
    for t in layout {
        if t.name.is_empty() || t.name.len() > 256 {
            return Err(ValidationError::TensorNameLength(t.name.len()));
        }
        if !names.insert(t.name.as_str()) {
            return Err(ValidationError::DuplicateTensor(t.name.clone()));
        }
        if t.shape.len() > 8 {
            return Err(ValidationError::TooManyDimensions {
                name: t.name.clone(),
                dims: t.shape.len(),
            });
        }
        let n = t
            .shape
            .iter()
            .try_fold(1u64, |acc, d| {
                acc.checked_mul(*d).filter(|n| *n <= MAX_PARAMETERS)
            })
            .ok_or_else(|| ValidationError::TensorTooLarge(t.name.clone()))?;
        total = total
            .checked_add(n)
            .filter(|n| *n <= MAX_PARAMETERS)
            .ok_or(ValidationError::ModelTooLarge)?;
    }
    Ok(total)
}

fn check_name(what: &'static str, s: &str) -> Result<(), ValidationError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadName {
            what,
            value: s.to_owned(),
        })
    }
}

/// Checks what every authored manifest must satisfy: its author is its
/// signer, and its model id and region are well-formed names.
fn check_scope(
    author: &NodeId,
    signer: &NodeId,
    model_id: &str,
    region: &str,
) -> Result<(), ValidationError> {
    if author != signer {
        return Err(ValidationError::AuthorNotSigner {
            author: *author,
            signer: *signer,
        });
    }
    check_name("model id", model_id)?;
    check_name("region", region)
}

/// Checks that `payload_bytes` cut into `chunk_size` pieces gives exactly
/// `chunks` chunks.
fn check_chunking(
    payload_bytes: u64,
    chunk_size: u32,
    chunks: usize,
) -> Result<(), ValidationError> {
    let cs = chunk_size as usize;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(ValidationError::ChunkSize(cs));
    }
    let expected = payload_bytes.div_ceil(u64::from(chunk_size));
    if expected != chunks as u64 {
        return Err(ValidationError::ChunkCount {
            payload_bytes,
            chunk_size: cs,
            expected,
            found: chunks,
        });
    }
    Ok(())
}

/// One node's contribution to one round: a compressed parameter delta
/// (Δ = θ − θ′, see DESIGN.md), described and addressed by its chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaManifest {
    /// The model this delta belongs to.
    pub model_id: String,
    /// The region (gossip scope) it was published in.
    pub region: String,
    /// The training round it contributes to.
    pub round: u64,
    /// Id of the model version the author trained from.
    pub base_version: ContentId,
    /// The author; must be the envelope's signer.
    pub author: NodeId,
    /// Per-author sequence number, strictly increasing, so replays are
    /// recognised.
    pub seq: u64,
    /// How the delta vector was encoded.
    pub codec: Codec,
    /// Names, shapes and dtypes of the model's tensors, in flattening order.
    pub layout: Vec<TensorSpec>,
    /// Length of the encoded payload in bytes.
    pub payload_bytes: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// BLAKE3 ids of the payload's chunks, in order.
    #[serde(with = "crate::id::id_list")]
    pub chunk_ids: Vec<ContentId>,
    /// Number of training samples behind the delta (its aggregation weight).
    pub sample_count: u64,
    /// L2 norm of the delta as decoded (what peers will aggregate).
    pub l2_norm: f32,
    /// Creation time, unix milliseconds (the author's clock; informative).
    pub created_unix_ms: u64,
}

impl SignedMessage for DeltaManifest {
    const DOMAIN_TAG: &'static str = "tapestry/v1/delta-manifest";

    fn validate(&self, signer: &NodeId) -> Result<(), ValidationError> {
        check_scope(&self.author, signer, &self.model_id, &self.region)?;
        self.codec.validate()?;
        let n = layout_elements(&self.layout)?;
        let expected = usize::try_from(n)
            .ok()
            .and_then(|n| self.codec.encoded_len(n))
            .ok_or(ValidationError::TooLargeForCodec)?;
        if expected as u64 != self.payload_bytes {
            return Err(ValidationError::DeltaPayload {
                elements: n,
                codec: self.codec,
                expected: expected as u64,
                found: self.payload_bytes,
            });
        }
        check_chunking(self.payload_bytes, self.chunk_size, self.chunk_ids.len())?;
        if self.sample_count == 0 {
            return Err(ValidationError::ZeroSamples);
        }
        if !self.l2_norm.is_finite() || self.l2_norm < 0.0 {
            return Err(ValidationError::BadNorm(self.l2_norm));
        }
        Ok(())
    }
}

/// A model version: the full parameters (raw little-endian f32) by their
/// chunks, plus its lineage — the versions it came from and the signed delta
/// manifests aggregated into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// The model.
    pub model_id: String,
    /// The region whose round produced it.
    pub region: String,
    /// The round it closes (0 for an initial model).
    pub round: u64,
    /// Who computed it (the envelope's signer).
    pub author: NodeId,
    /// Names, shapes and dtypes of the tensors, in flattening order; all f32.
    pub layout: Vec<TensorSpec>,
    /// Length of the parameter payload (4 bytes per parameter).
    pub payload_bytes: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// BLAKE3 ids of the payload's chunks, in order.
    #[serde(with = "crate::id::id_list")]
    pub chunk_ids: Vec<ContentId>,
    /// Ids of the model versions it was derived from (empty for an initial
    /// model; several when versions were mixed).
    #[serde(with = "crate::id::id_list")]
    pub parents: Vec<ContentId>,
    /// Ids (hashes of the signed envelopes) of the delta manifests aggregated
    /// into this version.
    #[serde(with = "crate::id::id_list")]
    pub deltas: Vec<ContentId>,
    /// Creation time, unix milliseconds (informative).
    pub created_unix_ms: u64,
}

impl SignedMessage for ModelManifest {
    const DOMAIN_TAG: &'static str = "tapestry/v1/model-manifest";

    fn validate(&self, signer: &NodeId) -> Result<(), ValidationError> {
        check_scope(&self.author, signer, &self.model_id, &self.region)?;
        let n = layout_elements(&self.layout)?;
        if let Some(t) = self.layout.iter().find(|t| t.dtype != DType::F32) {
            return Err(ValidationError::NotF32(t.name.clone()));
        }
        if n * 4 != self.payload_bytes {
            return Err(ValidationError::ModelPayload {
                elements: n,
                found: self.payload_bytes,
            });
        }
        check_chunking(self.payload_bytes, self.chunk_size, self.chunk_ids.len())?;
        if self.parents.len() > 256 {
            return Err(ValidationError::TooManyParents(self.parents.len()));
        }
        Ok(())
    }
}

/// The members of a permissioned region, signed by the region's key.
/// A newer roster (higher `version`) replaces an older one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roster {
    /// The model.
    pub model_id: String,
    /// The region this roster governs.
    pub region: String,
    /// Version number; strictly increasing per region.
    pub version: u64,
    /// Node ids allowed to publish, sorted and without duplicates.
    #[serde(with = "crate::id::id_list")]
    pub members: Vec<NodeId>,
    /// Creation time, unix milliseconds (informative).
    pub created_unix_ms: u64,
}

impl SignedMessage for Roster {
    const DOMAIN_TAG: &'static str = "tapestry/v1/roster";

    fn validate(&self, _signer: &NodeId) -> Result<(), ValidationError> {
        check_name("model id", &self.model_id)?;
        check_name("region", &self.region)?;
        if !self.members.windows(2).all(|w| w[0] < w[1]) {
            return Err(ValidationError::UnsortedRoster);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_tags_are_prefix_free() {
        let tags = [
            DeltaManifest::DOMAIN_TAG,
            ModelManifest::DOMAIN_TAG,
            Roster::DOMAIN_TAG,
        ];
        for a in tags {
            assert!(a.is_ascii());
            for b in tags {
                assert!(a == b || !b.starts_with(a), "{a} is a prefix of {b}");
            }
        }
    }

    #[test]
    fn layout_checks() {
        let t = |name: &str, shape: Vec<u64>| TensorSpec {
            name: name.into(),
            shape,
            dtype: DType::F32,
        };
        assert_eq!(
            layout_elements(&[t("w", vec![3, 4]), t("b", vec![4])]),
            Ok(16)
        );
        assert!(layout_elements(&[]).is_err());
        assert!(layout_elements(&[t("w", vec![3]), t("w", vec![3])]).is_err());
        assert!(layout_elements(&[t("w", vec![u64::MAX, 2])]).is_err());
        assert!(layout_elements(&[t("", vec![1])]).is_err());
    }
}
