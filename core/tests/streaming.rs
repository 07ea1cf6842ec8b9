//! Block-wise aggregation over encoded payloads gives the very bits of
//! today's whole-vector aggregation over the decoded deltas, for every rule
//! and codec, on deltas trained on the digits.

#![allow(clippy::unwrap_used)]

use tapestry_core::aggregate::{AggregationRule, Held, Values};
use tapestry_core::data::{self, Partition};
use tapestry_core::door::DoorConfig;
use tapestry_core::model::{InnerState, ModelSpec, train_local};
use tapestry_core::outer::OuterOptimizer;
use tapestry_core::verify::{DeltaInput, aggregate_onto_owned};
use tapestry_protocol::{Codec, ContentId};

/// One delta per node: `nodes` IID shares of the digits, 20 local steps of
/// SGD from one initial model; a node in `flipped` sends its delta ×(−5)
/// (so the robust rules have something to clip and trim).
fn digit_deltas(spec: &ModelSpec, nodes: usize, flipped: &[usize]) -> Vec<Vec<f32>> {
    let all = tapestry_testkit::digits();
    let shards = data::partition(&all, nodes, Partition::Dirichlet(0.5), 11).unwrap();
    let start = spec.init(5);
    let cfg = tapestry_testkit::sgd(20, 32, 0.05);
    shards
        .iter()
        .enumerate()
        .map(|(i, ix)| {
            let shard = all.subset(ix);
            let mut state = InnerState::default();
            let (trained, _) =
                train_local(spec, &start, &shard, &cfg, &mut state, i as u64).unwrap();
            let scale = if flipped.contains(&i) { -5.0 } else { 1.0 };
            trained
                .iter()
                .zip(&start)
                .map(|(t, s)| scale * (t - s))
                .collect()
        })
        .collect()
}

fn rules() -> Vec<AggregationRule> {
    [
        "mean",
        "trimmed-mean:0.2",
        "median",
        "clip:0.5:3",
        "median-clip:1:3",
        "aligned:1:3",
    ]
    .iter()
    .map(|r| r.parse().unwrap())
    .collect()
}

fn codecs() -> Vec<Codec> {
    [
        "f32",
        "bf16",
        "int8:64",
        "topk:0.05",
        "topk-bf16:0.05",
        "topk-int8:0.05",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check(spec: &ModelSpec, nodes: usize, flipped: &[usize]) {
    let deltas = digit_deltas(spec, nodes, flipped);
    let n = deltas[0].len();
    // Unequal weights, as sample-count weighting gives.
    let weights: Vec<f64> = (0..nodes).map(|i| 1.0 + (i % 3) as f64).collect();
    for codec in codecs() {
        let payloads: Vec<Vec<u8>> = deltas.iter().map(|d| codec.encode(d).unwrap()).collect();
        let decoded: Vec<Vec<f32>> = payloads
            .iter()
            .map(|p| codec.decode(p, n).unwrap())
            .collect();
        let whole: Vec<&[f32]> = decoded.iter().map(Vec::as_slice).collect();
        let encoded: Vec<Values<'_>> = payloads
            .iter()
            .map(|p| Values::Encoded {
                codec,
                payload: p,
                len: n,
            })
            .collect();
        let in_memory: Vec<Values<'_>> = decoded.iter().map(|d| Values::Decoded(d)).collect();
        // What the engine holds: the smaller of payload and decoded values.
        let held: Vec<Held> = payloads
            .iter()
            .zip(&decoded)
            .map(|(p, d)| Held::keep(codec, std::sync::Arc::new(p.clone()), d.clone()))
            .collect();
        let kept: Vec<Values<'_>> = held.iter().map(Held::values).collect();
        if codec != Codec::F32 {
            assert!(
                held.iter().all(|h| matches!(h, Held::Encoded { .. })),
                "{codec}: a compressed payload is kept encoded"
            );
        }
        for rule in rules() {
            let want = rule.aggregate(&whole, &weights, None).unwrap();
            for (how, inputs) in [
                ("encoded", &encoded),
                ("decoded", &in_memory),
                ("held", &kept),
            ] {
                let got = rule.aggregate_values(inputs, &weights, None).unwrap();
                assert_eq!(bits(&got), bits(&want), "{rule} on {codec}, {how}, n = {n}");
            }
            // Handed out a block at a time: the same bits, in order.
            let mut streamed = Vec::with_capacity(n);
            rule.aggregate_blocks(&encoded, &weights, None, |start, block| {
                assert_eq!(start, streamed.len(), "{rule}: blocks out of order");
                streamed.extend_from_slice(block);
            })
            .unwrap();
            assert_eq!(bits(&streamed), bits(&want), "{rule} on {codec}, in blocks");
            // A version's parameters: the outer step taken block by block
            // as the aggregate comes is the step on the whole aggregate.
            let parent: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let before: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            for (outer, previous) in [
                (OuterOptimizer::averaging(), None),
                (OuterOptimizer::Sgd { lr: 0.7 }, None),
                (OuterOptimizer::momentum(0.7, 0.9), None),
                (OuterOptimizer::momentum(0.7, 0.9), Some(before.as_slice())),
            ] {
                let mut cfg = tapestry_testkit::engine_config(rule, DoorConfig::default(), 1);
                cfg.outer = outer;
                let inputs: Vec<DeltaInput<'_>> = encoded
                    .iter()
                    .zip(&weights)
                    .enumerate()
                    .map(|(i, (v, w))| DeltaInput {
                        id: ContentId::of(&[i as u8]),
                        sample_count: *w as u64,
                        values: *v,
                    })
                    .collect();
                let got = aggregate_onto_owned(&cfg, parent.clone(), previous, &inputs).unwrap();
                let mut sorted: Vec<&DeltaInput<'_>> = inputs.iter().collect();
                sorted.sort_by_key(|d| d.id);
                let values: Vec<Values<'_>> = sorted.iter().map(|d| d.values).collect();
                let ws: Vec<f64> = sorted
                    .iter()
                    .map(|d| cfg.door.weighting.weight(d.sample_count))
                    .collect();
                let aggregate = rule.aggregate_values(&values, &ws, None).unwrap();
                let mut whole = parent.clone();
                outer.step(&mut whole, &aggregate, previous);
                assert_eq!(
                    bits(&got),
                    bits(&whole),
                    "{rule} on {codec}, outer {outer:?}"
                );
            }
            // With a centre (the node's own zero offset, as in mixing).
            let zero = vec![0f32; n];
            let want = rule.aggregate(&whole, &weights, Some(&zero)).unwrap();
            let got = rule
                .aggregate_values(&encoded, &weights, Some(&zero))
                .unwrap();
            assert_eq!(bits(&got), bits(&want), "{rule} on {codec} centred");
        }
    }
}

#[test]
fn block_wise_aggregation_of_payloads_is_bit_exact_on_digits() {
    // 650 values: less than one block.
    check(&tapestry_testkit::logistic(), 7, &[2]);
    // 13,130 values: three blocks of 4,096 and a partial one.
    let mlp = ModelSpec::Mlp {
        inputs: 64,
        hidden: vec![160, 16],
        classes: 10,
    };
    check(&mlp, 6, &[0, 4]);
}

#[test]
fn a_payload_that_does_not_decode_is_an_error_not_a_panic() {
    let codec = Codec::Int8 { block: 64 };
    let good = codec.encode(&[1.0; 100]).unwrap();
    let short = &good[..good.len() - 1];
    let inputs = [
        Values::Decoded(&[1.0; 100]),
        Values::Encoded {
            codec,
            payload: short,
            len: 100,
        },
    ];
    for rule in rules() {
        let e = rule
            .aggregate_values(&inputs, &[1.0, 1.0], None)
            .unwrap_err();
        assert!(e.to_string().starts_with("input 1: "), "{rule}: {e}");
    }
    // Lengths are checked before anything is read.
    let mismatched = [Values::Decoded(&[1.0; 100]), Values::Decoded(&[1.0; 99])];
    assert!(
        AggregationRule::Mean
            .aggregate_values(&mismatched, &[1.0, 1.0], None)
            .is_err()
    );
}
