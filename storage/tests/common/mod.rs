//! Fixtures shared by the storage tests.
#![allow(dead_code, clippy::unwrap_used)]

use tapestry_protocol::*;
use tapestry_storage::ChunkStore;

/// A test identity (publicly known seed).
pub fn key(seed: u8) -> Keypair {
    Keypair::from_secret_bytes(&[seed; 32])
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Stores a model version of `payload_len` pseudo-random bytes (a multiple of
/// 4) cut into `chunk_size` chunks, with the given parents and deltas.
pub fn put_version(
    store: &dyn ChunkStore,
    seed: u64,
    round: u64,
    payload_len: usize,
    chunk_size: usize,
    parents: Vec<ContentId>,
    deltas: Vec<ContentId>,
) -> Verified<ModelManifest> {
    let payload = bytes(seed, payload_len);
    let chunk_ids = store.put_payload(&payload, chunk_size).unwrap();
    let author = key(1);
    let m = ModelManifest {
        model_id: "test".into(),
        region: "local".into(),
        round,
        author: author.node_id(),
        layout: vec![TensorSpec {
            name: "w".into(),
            shape: vec![payload_len as u64 / 4],
            dtype: DType::F32,
        }],
        payload_bytes: payload_len as u64,
        chunk_size: chunk_size as u32,
        chunk_ids,
        parents,
        deltas,
        created_unix_ms: 0,
    };
    let v = Signed::sign(m, &author).unwrap();
    store.put_model_manifest(&v).unwrap();
    v
}

/// Stores a delta manifest (int8, 1000 parameters) and its chunks.
pub fn put_delta(store: &dyn ChunkStore, seed: u64, round: u64) -> Verified<DeltaManifest> {
    let author = key(2);
    let codec = Codec::Int8 { block: 256 };
    let len = codec.encoded_len(1000).unwrap();
    let payload = bytes(seed, len);
    let chunk_ids = store.put_payload(&payload, 4096).unwrap();
    let m = DeltaManifest {
        model_id: "test".into(),
        region: "local".into(),
        round,
        base_version: ContentId::of(b"base"),
        author: author.node_id(),
        seq: seed,
        codec,
        layout: vec![TensorSpec {
            name: "w".into(),
            shape: vec![1000],
            dtype: DType::F32,
        }],
        payload_bytes: len as u64,
        chunk_size: 4096,
        chunk_ids,
        sample_count: 10,
        l2_norm: 1.0,
        created_unix_ms: 0,
    };
    let v = Signed::sign(m, &author).unwrap();
    store.put_delta_manifest(&v).unwrap();
    v
}

/// Whether every chunk of a version is present and verifies.
pub fn version_complete(store: &dyn ChunkStore, version: &ContentId) -> bool {
    let Ok(Some(m)) = store.get_model_manifest(version) else {
        return false;
    };
    store
        .read_payload(&m.message().chunk_ids, m.message().payload_bytes)
        .is_ok()
}
