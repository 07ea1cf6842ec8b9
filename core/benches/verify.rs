//! What verifying a peer's version costs, side by side with what a round of
//! local training costs on the same machine: recomputing a version of
//! three deltas (decode, door checks, aggregation, outer step, BLAKE3 of
//! the parameters' chunks, comparison) for the digits MLP (4,810 values)
//! and a 17-million-parameter MLP (64-4096-4096-10), against one round of
//! local training (5 inner steps, batch 32) of the same model.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tapestry_core::aggregate::AggregationRule;
use tapestry_core::data;
use tapestry_core::door::{Door, DoorConfig};
use tapestry_core::engine::{EngineConfig, Mode};
use tapestry_core::model::{InnerOptimizer, InnerState, ModelSpec, TrainConfig, train_local};
use tapestry_core::outer::OuterOptimizer;
use tapestry_core::verify::{self, DeltaInput};
use tapestry_protocol::*;
use tapestry_testkit::sign;
use tapestry_testkit::swarm::MemLineage;

/// A held parent, three held deltas, and the honest version built on them.
fn setup(cfg: &EngineConfig) -> (MemLineage, Verified<ModelManifest>) {
    let n = cfg.spec.n_params();
    let mut l = MemLineage::default();
    let parent_params = cfg.spec.init(1);
    let key = Keypair::from_secret_bytes(&[1; 32]);
    let parent = sign::version(
        cfg,
        &key,
        1,
        &parent_params,
        vec![ContentId::of(b"g")],
        vec![],
    );
    l.models.insert(parent.id(), parent.clone());
    l.verified.insert(parent.id(), parent_params.clone());
    let mut held = Vec::new();
    for k in 0..3u8 {
        let author = Keypair::from_secret_bytes(&[k + 10; 32]);
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + k as usize) % 13) as f32 * 1e-4)
            .collect();
        let (mut m, payload) = sign::delta_manifest(cfg, &author, 1, 1, &values);
        m.base_version = parent.id();
        m.sample_count = 100;
        let d = sign::signed(m, &author);
        held.push((d.id(), values));
        l.add_delta(&d, &payload);
    }
    let inputs: Vec<DeltaInput<'_>> = held
        .iter()
        .map(|(id, v)| DeltaInput {
            id: *id,
            sample_count: 100,
            values: tapestry_core::aggregate::Values::Decoded(v),
        })
        .collect();
    let params = verify::aggregate_onto(cfg, &parent_params, &inputs).unwrap();
    let v = sign::version(
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
            federation: None,
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
