//! What verifying a peer's version costs, side by side with what a round of
//! local training costs on the same machine: recomputing a version of
//! three deltas (decode, door checks, aggregation, outer step, BLAKE3 of
//! the parameters' chunks, comparison) for the digits MLP (4,810 values)
//! and a 17-million-parameter MLP (64-4096-4096-10), against one round of
//! local training (5 inner steps, batch 32) of the same model.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tapestry_core::aggregate::AggregationRule;
use tapestry_core::data;
use tapestry_core::door::{Door, DoorConfig};
use tapestry_core::engine::{EngineConfig, Mode};
use tapestry_core::model::{InnerOptimizer, InnerState, ModelSpec, TrainConfig, train_local};
use tapestry_core::outer::OuterOptimizer;
use tapestry_core::verify::{self, DeltaInput, Lineage};
use tapestry_protocol::*;

#[derive(Default)]
struct Mem {
    models: HashMap<ContentId, Verified<ModelManifest>>,
    deltas: HashMap<ContentId, (Verified<DeltaManifest>, Vec<u8>)>,
    params: HashMap<ContentId, Vec<f32>>,
}

impl Lineage for Mem {
    fn model(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        self.models.get(id).cloned()
    }
    fn delta(&self, id: &ContentId) -> Option<Verified<DeltaManifest>> {
        self.deltas.get(id).map(|d| d.0.clone())
    }
    fn has_payload(&self, d: &Verified<DeltaManifest>) -> bool {
        self.deltas.contains_key(&d.id())
    }
    fn payload(&self, d: &Verified<DeltaManifest>) -> Option<Vec<u8>> {
        self.deltas.get(&d.id()).map(|d| d.1.clone())
    }
    fn is_verified(&self, id: &ContentId) -> bool {
        self.params.contains_key(id)
    }
    fn params(&self, id: &ContentId) -> Option<Vec<f32>> {
        self.params.get(id).cloned()
    }
}

fn sign_version(
    cfg: &EngineConfig,
    key: &Keypair,
    round: u64,
    params: &[f32],
    parents: Vec<ContentId>,
    deltas: Vec<ContentId>,
) -> Verified<ModelManifest> {
    Signed::sign(
        ModelManifest {
            model_id: cfg.model_id.clone(),
            region: cfg.region.clone(),
            round,
            author: key.node_id(),
            layout: cfg.spec.layout(),
            payload_bytes: params.len() as u64 * 4,
            chunk_size: cfg.chunk_size as u32,
            chunk_ids: verify::params_chunk_ids(params, cfg.chunk_size),
            parents,
            deltas,
            created_unix_ms: 0,
        },
        key,
    )
    .unwrap()
}

/// A held parent, three held deltas, and the honest version built on them.
fn setup(cfg: &EngineConfig) -> (Mem, Verified<ModelManifest>) {
    let n = cfg.spec.n_params();
    let mut l = Mem::default();
    let parent_params = cfg.spec.init(1);
    let key = Keypair::from_secret_bytes(&[1; 32]);
    let parent = sign_version(
        cfg,
        &key,
        1,
        &parent_params,
        vec![ContentId::of(b"g")],
        vec![],
    );
    l.models.insert(parent.id(), parent.clone());
    l.params.insert(parent.id(), parent_params.clone());
    let mut held = Vec::new();
    for k in 0..3u8 {
        let author = Keypair::from_secret_bytes(&[k + 10; 32]);
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + k as usize) % 13) as f32 * 1e-4)
            .collect();
        let payload = Codec::F32.encode(&values).unwrap();
        let norm = values
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt() as f32;
        let d = Signed::sign(
            DeltaManifest {
                model_id: cfg.model_id.clone(),
                region: cfg.region.clone(),
                round: 1,
                base_version: parent.id(),
                author: author.node_id(),
                seq: 1,
                codec: Codec::F32,
                layout: cfg.spec.layout(),
                payload_bytes: payload.len() as u64,
                chunk_size: cfg.chunk_size as u32,
                chunk_ids: payload.chunks(cfg.chunk_size).map(ContentId::of).collect(),
                sample_count: 100,
                l2_norm: norm,
                created_unix_ms: 0,
            },
            &author,
        )
        .unwrap();
        held.push((d.id(), values));
        l.deltas.insert(d.id(), (d, payload));
    }
    let inputs: Vec<DeltaInput<'_>> = held
        .iter()
        .map(|(id, v)| DeltaInput {
            id: *id,
            sample_count: 100,
            values: v,
        })
        .collect();
    let params = verify::aggregate_onto(cfg, &parent_params, &inputs).unwrap();
    let v = sign_version(
        cfg,
        &key,
        2,
        &params,
        vec![parent.id()],
        held.iter().map(|(id, _)| *id).collect(),
    );
    (l, v)
}

fn verification(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify_vs_train");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for (name, hidden) in [
        ("mlp_64_64_10", vec![64]),
        ("mlp_64_4096_4096_10", vec![4096, 4096]),
    ] {
        let spec = ModelSpec::Mlp {
            inputs: 64,
            hidden,
            classes: 10,
        };
        let cfg = EngineConfig {
            model_id: "digits".into(),
            region: "bench".into(),
            spec: spec.clone(),
            codec: Codec::F32,
            chunk_size: DEFAULT_CHUNK_SIZE,
            rule: AggregationRule::Mean,
            outer: OuterOptimizer::averaging(),
            quorum: 1.0,
            round_timeout_ms: 10_000,
            door: DoorConfig::default(),
            mode: Mode::Broadcast,
            seed: 0,
        };
        let (l, v) = setup(&cfg);
        let door = Door::new(cfg.door.clone(), &cfg.model_id, &cfg.region, spec.layout());
        eprintln!("{name}: {} parameters", spec.n_params());
        g.bench_function(BenchmarkId::new("recompute_3_deltas", name), |b| {
            b.iter(|| verify::verify_version(&l, &cfg, &door, &v).unwrap())
        });
        let train = data::synthetic(1, 1797, 64, 10);
        let tc = TrainConfig {
            local_steps: 5,
            batch_size: 32,
            optimizer: InnerOptimizer::SgdMomentum {
                lr: 0.05,
                momentum: 0.9,
            },
        };
        let params = spec.init(1);
        g.bench_function(BenchmarkId::new("train_5_steps", name), |b| {
            b.iter(|| {
                train_local(&spec, &params, &train, &tc, &mut InnerState::default(), 1).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
