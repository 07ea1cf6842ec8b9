//! Shared fixtures for the protocol's integration tests.
#![allow(dead_code)]

use proptest::prelude::*;
use tapestry_protocol::*;

/// A fixed, publicly known test key (never use such a key for real).
pub fn test_key(seed: u8) -> Keypair {
    Keypair::from_secret_bytes(&[seed; 32])
}

/// A 10×64 + 10 logistic-regression layout.
pub fn small_layout() -> Vec<TensorSpec> {
    vec![
        TensorSpec {
            name: "linear.weight".into(),
            shape: vec![10, 64],
            dtype: DType::F32,
        },
        TensorSpec {
            name: "linear.bias".into(),
            shape: vec![10],
            dtype: DType::F32,
        },
    ]
}

/// Chunk ids for a payload of `bytes` in `chunk` sized pieces (made-up content).
pub fn fake_chunks(bytes: u64, chunk: u32) -> Vec<ContentId> {
    (0..bytes.div_ceil(u64::from(chunk)))
        .map(|i| ContentId::of(&i.to_le_bytes()))
        .collect()
}

/// A valid delta manifest by `author`.
pub fn sample_delta(author: &Keypair) -> DeltaManifest {
    let codec = Codec::Int8 { block: 256 };
    let payload = codec.encoded_len(650).unwrap() as u64;
    DeltaManifest {
        model_id: "digits-logreg".into(),
        region: "eu-west".into(),
        round: 42,
        base_version: ContentId::of(b"model version 41"),
        author: author.node_id(),
        seq: 7,
        codec,
        layout: small_layout(),
        payload_bytes: payload,
        chunk_size: 4096,
        chunk_ids: fake_chunks(payload, 4096),
        sample_count: 1347,
        l2_norm: 0.8125,
        created_unix_ms: 1_795_000_000_000,
    }
}

/// A valid model manifest by `author`.
pub fn sample_model(author: &Keypair) -> ModelManifest {
    let payload = 650 * 4;
    ModelManifest {
        model_id: "digits-logreg".into(),
        region: "eu-west".into(),
        round: 42,
        author: author.node_id(),
        layout: small_layout(),
        payload_bytes: payload,
        chunk_size: 4096,
        chunk_ids: fake_chunks(payload, 4096),
        parents: vec![ContentId::of(b"model version 41")],
        deltas: vec![ContentId::of(b"delta a"), ContentId::of(b"delta b")],
        created_unix_ms: 1_795_000_000_000,
    }
}

/// Names that pass validation.
pub fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}

pub fn content_id() -> impl Strategy<Value = ContentId> {
    any::<[u8; 32]>().prop_map(ContentId::from_bytes)
}

pub fn codec() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::F32),
        Just(Codec::Bf16),
        (64u32..=4096).prop_map(|block| Codec::Int8 { block }),
        (0.001f32..=1.0).prop_map(|fraction| Codec::TopK { fraction }),
        (0.001f32..=1.0).prop_map(|fraction| Codec::TopKBf16 { fraction }),
        (0.001f32..=1.0).prop_map(|fraction| Codec::TopKInt8 { fraction }),
    ]
}

pub fn layout() -> impl Strategy<Value = Vec<TensorSpec>> {
    prop::collection::vec((prop::collection::vec(1u64..40, 0..3), any::<bool>()), 1..5).prop_map(
        |ts| {
            ts.into_iter()
                .enumerate()
                .map(|(i, (shape, _))| TensorSpec {
                    name: format!("t{i}.weight"),
                    shape,
                    dtype: DType::F32,
                })
                .collect()
        },
    )
}

/// Any valid delta manifest signed by `author`.
pub fn delta_manifest(author: NodeId) -> impl Strategy<Value = DeltaManifest> {
    (
        name(),
        name(),
        any::<u64>(),
        content_id(),
        any::<u64>(),
        codec(),
        layout(),
        (4096u32..70000),
        1u64..u64::MAX,
        0f32..1e30,
        any::<u64>(),
    )
        .prop_map(
            move |(
                model_id,
                region,
                round,
                base_version,
                seq,
                codec,
                layout,
                chunk_size,
                sample_count,
                l2_norm,
                created_unix_ms,
            )| {
                let n: u64 = layout.iter().map(|t| t.shape.iter().product::<u64>()).sum();
                let payload_bytes = codec.encoded_len(n as usize).unwrap() as u64;
                DeltaManifest {
                    model_id,
                    region,
                    round,
                    base_version,
                    author,
                    seq,
                    codec,
                    layout,
                    payload_bytes,
                    chunk_size,
                    chunk_ids: fake_chunks(payload_bytes, chunk_size),
                    sample_count,
                    l2_norm,
                    created_unix_ms,
                }
            },
        )
}

/// Any valid model manifest signed by `author`.
pub fn model_manifest(author: NodeId) -> impl Strategy<Value = ModelManifest> {
    (
        name(),
        name(),
        any::<u64>(),
        layout(),
        4096u32..70000,
        prop::collection::vec(content_id(), 0..4),
        prop::collection::vec(content_id(), 0..20),
        any::<u64>(),
    )
        .prop_map(
            move |(
                model_id,
                region,
                round,
                layout,
                chunk_size,
                parents,
                deltas,
                created_unix_ms,
            )| {
                let n: u64 = layout.iter().map(|t| t.shape.iter().product::<u64>()).sum();
                let payload_bytes = n * 4;
                ModelManifest {
                    model_id,
                    region,
                    round,
                    author,
                    layout,
                    payload_bytes,
                    chunk_size,
                    chunk_ids: fake_chunks(payload_bytes, chunk_size),
                    parents,
                    deltas,
                    created_unix_ms,
                }
            },
        )
}

/// Renders a CBOR item as JSON, byte strings as lowercase hex (for the
/// golden vectors; read without the crate's types).
pub fn cbor_to_json(v: &ciborium::Value) -> serde_json::Value {
    use ciborium::Value as C;
    use serde_json::{Value as Json, json};
    match v {
        C::Integer(i) => json!(i128::from(*i)),
        C::Bytes(b) => json!(hex::encode(b)),
        C::Float(f) => json!(f),
        C::Text(t) => json!(t),
        C::Bool(b) => json!(b),
        C::Null => Json::Null,
        C::Array(a) => Json::Array(a.iter().map(cbor_to_json).collect()),
        C::Map(m) => Json::Object(
            m.iter()
                .map(|(k, v)| (k.as_text().expect("text keys").to_owned(), cbor_to_json(v)))
                .collect(),
        ),
        other => panic!("unexpected CBOR item {other:?}"),
    }
}
