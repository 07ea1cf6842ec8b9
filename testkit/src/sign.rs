//! Signed manifests for tests and benchmarks: model versions and deltas of
//! an engine config's model and region, built from parameters or values the
//! way an honest node builds them (f32 payloads, the config's layout and
//! chunking), signed by any key. A test that forges something makes it with
//! these and then changes only what it forges.

use tapestry_core::engine::EngineConfig;
use tapestry_core::verify::{DeltaInput, aggregate_onto, params_chunk_ids};
use tapestry_protocol::{
    Codec, ContentId, DeltaManifest, Keypair, ModelManifest, Signed, Verified,
};

/// The L2 norm of `values`, summed in f64 as a delta manifest states it.
pub fn l2_norm(values: &[f32]) -> f32 {
    values
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt() as f32
}

/// A version of `params` at `round` by `key`, with these parents and
/// deltas, for `cfg`'s model and region (created at time 0).
pub fn version(
    cfg: &EngineConfig,
    key: &Keypair,
    round: u64,
    params: &[f32],
    parents: Vec<ContentId>,
    deltas: Vec<ContentId>,
) -> Verified<ModelManifest> {
    let manifest = ModelManifest {
        model_id: cfg.model_id.clone(),
        region: cfg.region.clone(),
        round,
        author: key.node_id(),
        layout: cfg.spec.layout(),
        payload_bytes: params.len() as u64 * 4,
        chunk_size: cfg.chunk_size as u32,
        chunk_ids: params_chunk_ids(params, cfg.chunk_size),
        parents,
        deltas,
        created_unix_ms: 0,
    };
    Signed::sign(manifest, key).unwrap_or_else(|e| panic!("signing a test version: {e}"))
}

/// The honest version one delta on from `parent` (a version and its
/// parameters): `delta`'s `values`, counted as one sample, aggregated onto
/// the parent's parameters by `cfg`'s rule and outer step, signed by `key`
/// for the parent's next round. Returns the version and its parameters.
pub fn child(
    cfg: &EngineConfig,
    key: &Keypair,
    parent: (&Verified<ModelManifest>, &[f32]),
    delta: &Verified<DeltaManifest>,
    values: &[f32],
) -> (Verified<ModelManifest>, Vec<f32>) {
    let input = DeltaInput {
        id: delta.id(),
        sample_count: 1,
        values: tapestry_core::aggregate::Values::Decoded(values),
    };
    let params = aggregate_onto(cfg, parent.1, &[input])
        .unwrap_or_else(|e| panic!("aggregating a test delta: {e}"));
    let round = parent.0.message().round + 1;
    let v = version(
        cfg,
        key,
        round,
        &params,
        vec![parent.0.id()],
        vec![delta.id()],
    );
    (v, params)
}

/// The unsigned manifest and f32 payload of a delta of `values` for `round`,
/// by `key` with sequence number `seq`, for `cfg`'s model and region. It
/// names no real base version (the hash of nothing) and claims `u64::MAX`
/// samples; set other fields before signing where a test needs them.
pub fn delta_manifest(
    cfg: &EngineConfig,
    key: &Keypair,
    round: u64,
    seq: u64,
    values: &[f32],
) -> (DeltaManifest, Vec<u8>) {
    let payload = Codec::F32
        .encode(values)
        .unwrap_or_else(|e| panic!("encoding a test delta: {e}"));
    let manifest = DeltaManifest {
        model_id: cfg.model_id.clone(),
        region: cfg.region.clone(),
        round,
        base_version: ContentId::of(b""),
        author: key.node_id(),
        seq,
        codec: Codec::F32,
        layout: cfg.spec.layout(),
        payload_bytes: payload.len() as u64,
        chunk_size: cfg.chunk_size as u32,
        chunk_ids: payload.chunks(cfg.chunk_size).map(ContentId::of).collect(),
        sample_count: u64::MAX,
        l2_norm: l2_norm(values),
        created_unix_ms: 0,
    };
    (manifest, payload)
}

/// [`delta_manifest`], signed by `key`: the delta and its payload.
pub fn delta(
    cfg: &EngineConfig,
    key: &Keypair,
    round: u64,
    seq: u64,
    values: &[f32],
) -> (Verified<DeltaManifest>, Vec<u8>) {
    let (manifest, payload) = delta_manifest(cfg, key, round, seq, values);
    (signed(manifest, key), payload)
}

/// `manifest` signed by `key` (panics if it does not validate).
pub fn signed(manifest: DeltaManifest, key: &Keypair) -> Verified<DeltaManifest> {
    Signed::sign(manifest, key).unwrap_or_else(|e| panic!("signing a test delta: {e}"))
}
