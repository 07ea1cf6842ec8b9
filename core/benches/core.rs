//! Criterion benchmarks of the learning core: aggregation of 16 deltas of 10
//! million values under each rule, and inner training throughput of the MLP
//! on the digits set (or the synthetic set when the shared data is absent).

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tapestry_core::aggregate::{AggregationRule, Values};
use tapestry_core::data::{self, CsvOptions, Scaler};
use tapestry_core::model::{InnerOptimizer, InnerState, ModelSpec, TrainConfig, train_local};
use tapestry_protocol::Codec;

fn encoded(codec: Codec, payloads: &[Vec<u8>], len: usize) -> Vec<Values<'_>> {
    payloads
        .iter()
        .map(|p| Values::Encoded {
            codec,
            payload: p,
            len,
        })
        .collect()
}

fn aggregation(c: &mut Criterion) {
    const N: usize = 10_000_000;
    const K: usize = 16;
    let mut x = 0x1234_5678u64;
    let deltas: Vec<Vec<f32>> = (0..K)
        .map(|_| {
            (0..N)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
    let weights = vec![1.0; K];
    let mut g = c.benchmark_group("aggregate_16x10m");
    g.throughput(Throughput::Bytes((K * N * 4) as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    for rule in [
        AggregationRule::Mean,
        AggregationRule::TrimmedMean { beta: 0.2 },
        AggregationRule::Median,
        AggregationRule::CenteredClip {
            radius: 100.0,
            iterations: 1,
        },
    ] {
        g.bench_function(BenchmarkId::from_parameter(rule.to_string()), |b| {
            b.iter(|| {
                rule.aggregate(black_box(&refs), &weights, Some(refs[0]))
                    .unwrap()
            })
        });
    }
    g.finish();

    // Block-wise over the same inputs, side by side: decoded in memory, and
    // as payloads decoded while aggregating (f32 and top-1 % int8).
    let mut g = c.benchmark_group("aggregate_values_16x10m");
    g.throughput(Throughput::Bytes((K * N * 4) as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    let f32_payloads: Vec<Vec<u8>> = deltas
        .iter()
        .map(|d| Codec::F32.encode(d).unwrap())
        .collect();
    let topk = Codec::TopKInt8 { fraction: 0.01 };
    let topk_payloads: Vec<Vec<u8>> = deltas.iter().map(|d| topk.encode(d).unwrap()).collect();
    let topk_decoded: Vec<Vec<f32>> = topk_payloads
        .iter()
        .map(|p| topk.decode(p, N).unwrap())
        .collect();
    let topk_refs: Vec<&[f32]> = topk_decoded.iter().map(Vec::as_slice).collect();
    let in_memory: Vec<Values<'_>> = deltas.iter().map(|d| Values::Decoded(d)).collect();
    let f32_encoded = encoded(Codec::F32, &f32_payloads, N);
    let topk_encoded = encoded(topk, &topk_payloads, N);
    for rule in [AggregationRule::Mean, AggregationRule::Median] {
        g.bench_function(BenchmarkId::new("whole", rule.to_string()), |b| {
            b.iter(|| rule.aggregate(black_box(&refs), &weights, None).unwrap())
        });
        g.bench_function(BenchmarkId::new("blocks-decoded", rule.to_string()), |b| {
            b.iter(|| {
                rule.aggregate_values(black_box(&in_memory), &weights, None)
                    .unwrap()
            })
        });
        g.bench_function(
            BenchmarkId::new("blocks-f32-payload", rule.to_string()),
            |b| {
                b.iter(|| {
                    rule.aggregate_values(black_box(&f32_encoded), &weights, None)
                        .unwrap()
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("whole-topk-int8-decoded", rule.to_string()),
            |b| {
                b.iter(|| {
                    rule.aggregate(black_box(&topk_refs), &weights, None)
                        .unwrap()
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("blocks-topk-int8-payload", rule.to_string()),
            |b| {
                b.iter(|| {
                    rule.aggregate_values(black_box(&topk_encoded), &weights, None)
                        .unwrap()
                })
            },
        );
    }
    g.finish();
}

fn training(c: &mut Criterion) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/digits.csv.gz");
    let (mut train, label) = match data::load_csv(&path, CsvOptions::default()) {
        Ok(d) => (d, "digits"),
        Err(_) => (data::synthetic(1, 1797, 64, 10), "synthetic"),
    };
    Scaler::fit(&train).apply(&mut train);
    let spec = ModelSpec::Mlp {
        inputs: 64,
        hidden: vec![64],
        classes: 10,
    };
    let params = spec.init(1);
    let mut g = c.benchmark_group("inner_training");
    for batch in [32usize, 128] {
        let config = TrainConfig {
            local_steps: 50,
            batch_size: batch,
            optimizer: InnerOptimizer::SgdMomentum {
                lr: 0.05,
                momentum: 0.9,
            },
        };
        g.throughput(Throughput::Elements((50 * batch) as u64));
        g.bench_function(
            BenchmarkId::new(format!("mlp_64_64_10_{label}"), format!("batch{batch}")),
            |b| {
                b.iter(|| {
                    let mut state = InnerState::default();
                    train_local(&spec, &params, &train, &config, &mut state, 1).unwrap()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, aggregation, training);
criterion_main!(benches);
