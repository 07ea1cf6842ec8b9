//! Codec round trips and error bounds.

#![allow(clippy::unwrap_used)]

mod common;

use common::codec;
use proptest::prelude::*;
use tapestry_protocol::*;

/// Finite f32 values over a wide range of magnitudes, some exactly zero.
fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    values_len(0..max_len)
}

fn values_len(len: impl Into<prop::collection::SizeRange>) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            4 => -1e3f32..1e3,
            1 => (-30i32..30, -1f32..1.0).prop_map(|(e, m)| m * 2f32.powi(e)),
            1 => Just(0.0f32),
            1 => prop::num::f32::NORMAL,
        ],
        len,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_codec_round_trips_with_the_promised_length(c in codec(), v in values(3000)) {
        let bytes = c.encode(&v).unwrap();
        prop_assert_eq!(Some(bytes.len()), c.encoded_len(v.len()));
        let back = c.decode(&bytes, v.len()).unwrap();
        prop_assert_eq!(back.len(), v.len());
        // Deterministic: the same input gives the same bytes.
        prop_assert_eq!(c.encode(&v).unwrap(), bytes);
    }

    #[test]
    fn f32_is_exact(v in values(3000)) {
        let back = Codec::F32.decode(&Codec::F32.encode(&v).unwrap(), v.len()).unwrap();
        prop_assert_eq!(back, v);
    }

    #[test]
    fn bf16_relative_error_at_most_2_pow_minus_8(v in values(3000)) {
        let back = Codec::Bf16.decode(&Codec::Bf16.encode(&v).unwrap(), v.len()).unwrap();
        for (x, y) in v.iter().zip(&back) {
            if x.is_normal() {
                let rel = ((x - y).abs() / x.abs()) as f64;
                prop_assert!(rel <= 2f64.powi(-8), "{x} -> {y}: relative error {rel}");
            } else {
                // Subnormals keep fewer significant bits: bound the absolute error
                // by half a bf16 subnormal step (2^-134).
                prop_assert!(((x - y).abs() as f64) <= 2f64.powi(-134), "{x} -> {y}");
            }
        }
    }

    #[test]
    fn int8_error_at_most_half_a_step_per_block(block in 64u32..=4096, v in values(9000)) {
        let c = Codec::Int8 { block };
        let bytes = c.encode(&v).unwrap();
        let back = c.decode(&bytes, v.len()).unwrap();
        for (chunk, out) in v.chunks(block as usize).zip(back.chunks(block as usize)) {
            let scale = chunk.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in chunk.iter().zip(out) {
                // scale/2, plus the rounding of the f32 arithmetic itself
                // (a few ulps of the values involved).
                let slack = 4.0 * f32::EPSILON * (x.abs() + scale);
                prop_assert!((x - y).abs() <= scale / 2.0 + slack,
                    "{x} -> {y} with scale {scale}");
            }
        }
    }

    #[test]
    fn topk_keeps_exactly_the_largest(fraction in 0.001f32..=1.0, v in values(3000)) {
        let c = Codec::TopK { fraction };
        let back = c.decode(&c.encode(&v).unwrap(), v.len()).unwrap();
        let k = ((fraction as f64 * v.len() as f64).round() as usize).clamp(usize::from(!v.is_empty()), v.len());
        let kept: Vec<usize> = (0..v.len()).filter(|i| back[*i] == v[*i] && (v[*i] != 0.0 || back[*i] != 0.0)).collect();
        // Every value is either kept exactly or dropped to zero.
        for (x, y) in v.iter().zip(&back) {
            prop_assert!(*y == *x || *y == 0.0);
        }
        // No dropped value is larger in magnitude than a kept one.
        let min_kept = (0..v.len()).filter(|i| back[*i] != 0.0).map(|i| v[i].abs()).fold(f32::INFINITY, f32::min);
        let max_dropped = (0..v.len()).filter(|i| back[*i] == 0.0).map(|i| v[i].abs()).fold(0f32, f32::max);
        if kept.len() == k && k < v.len() {
            prop_assert!(max_dropped <= min_kept);
        }
        prop_assert!(kept.len() <= k);
    }

    #[test]
    fn composed_topk_keeps_the_same_places_and_quantises_only_the_values(
        fraction in 0.001f32..=1.0,
        v in values(3000),
    ) {
        // topk-bf16 and topk-int8 choose the same k places as topk; each kept
        // value is what bf16 / int8:256 make of the kept values alone.
        let plain = Codec::TopK { fraction };
        let plain_bytes = plain.encode(&v).unwrap();
        let k = u32::from_le_bytes(plain_bytes[..4].try_into().unwrap()) as usize;
        let places: Vec<usize> = plain_bytes[4..4 + 4 * k]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect();
        let kept: Vec<f32> = places.iter().map(|i| v[*i]).collect();
        for (composed, dense) in [
            (Codec::TopKBf16 { fraction }, Codec::Bf16),
            (Codec::TopKInt8 { fraction }, Codec::Int8 { block: TOPK_INT8_BLOCK }),
        ] {
            let bytes = composed.encode(&v).unwrap();
            prop_assert_eq!(Some(bytes.len()), composed.encoded_len(v.len()));
            let back = composed.decode(&bytes, v.len()).unwrap();
            let want = dense.decode(&dense.encode(&kept).unwrap(), kept.len()).unwrap();
            for (i, w) in places.iter().zip(&want) {
                prop_assert_eq!(back[*i].to_bits(), w.to_bits(), "{} at {}", composed, i);
            }
            let elsewhere = (0..v.len()).filter(|i| !places.contains(i)).all(|i| back[i] == 0.0);
            prop_assert!(elsewhere, "{} put a value where topk keeps none", composed);
        }
    }

    #[test]
    fn a_range_decodes_to_the_same_bits_as_the_whole(
        c in codec(),
        v in values(700),
        cut in prop::collection::vec(0usize..=700, 0..6),
    ) {
        let bytes = c.encode(&v).unwrap();
        let whole = c.decode(&bytes, v.len()).unwrap();
        // Ranges between sorted cut points (clamped to the length) cover it.
        let mut points: Vec<usize> = cut.into_iter().map(|p| p.min(v.len())).collect();
        points.push(0);
        points.push(v.len());
        points.sort_unstable();
        for w in points.windows(2) {
            let mut out = vec![f32::NAN; w[1] - w[0]];
            c.decode_range(&bytes, v.len(), w[0], &mut out).unwrap();
            for (k, (a, b)) in out.iter().zip(&whole[w[0]..w[1]]).enumerate() {
                prop_assert_eq!(a.to_bits(), b.to_bits(), "{} at {}", c, w[0] + k);
            }
        }
        let mut past = vec![0f32; 2];
        prop_assert!(c.decode_range(&bytes, v.len(), v.len(), &mut past).is_err());
        if !bytes.is_empty() {
            prop_assert!(c.decode_range(&bytes[1..], v.len(), 0, &mut past[..0]).is_err());
        }
    }

    #[test]
    fn decoding_in_blocks_is_decoding_whole_even_for_corrupt_payloads(
        c in codec(),
        v in values(700),
        block in 1usize..300,
        flips in prop::collection::vec((0usize..4000, any::<u8>()), 0..4),
    ) {
        let mut bytes = c.encode(&v).unwrap();
        // Bytes overwritten at random: often corrupt, sometimes not.
        for (at, b) in flips {
            if !bytes.is_empty() {
                let at = at % bytes.len();
                bytes[at] = b;
            }
        }
        let whole = c.decode(&bytes, v.len());
        let mut got = Vec::new();
        let mut largest = 0;
        let blocks = c.decode_blocks(&bytes, v.len(), block, |b| {
            largest = largest.max(b.len());
            got.extend_from_slice(b);
        });
        prop_assert!(largest <= block);
        match whole {
            Ok(w) => {
                prop_assert_eq!(blocks, Ok(()));
                prop_assert_eq!(w.len(), got.len());
                for (a, b) in w.iter().zip(&got) {
                    prop_assert_eq!(a.to_bits(), b.to_bits());
                }
            }
            Err(e) => prop_assert_eq!(blocks, Err(e)),
        }
    }

    #[test]
    fn error_feedback_loses_nothing_over_rounds(c in codec(), deltas in prop::collection::vec(values_len(200), 1..6)) {
        // Sum of what was transmitted + final residual == sum of the deltas.
        let mut ef = ErrorFeedback::new(200);
        let mut sent = vec![0f64; 200];
        let mut truth = vec![0f64; 200];
        for d in &deltas {
            let bytes = ef.encode(&c, d).unwrap();
            let dec = c.decode(&bytes, 200).unwrap();
            for i in 0..200 {
                sent[i] += f64::from(dec[i]);
                truth[i] += f64::from(d[i]);
            }
        }
        for i in 0..200 {
            let got = sent[i] + f64::from(ef.residual().get(i).copied().unwrap_or(0.0));
            let tol = 1e-5 * (1.0 + truth[i].abs() + deltas.iter().map(|d| f64::from(d[i].abs())).sum::<f64>());
            prop_assert!((got - truth[i]).abs() <= tol, "{} vs {}", got, truth[i]);
        }
    }
}

#[test]
fn decoders_refuse_corrupt_payloads() {
    let v: Vec<f32> = (0..100).map(|i| i as f32 - 50.0).collect();
    for c in [
        Codec::F32,
        Codec::Bf16,
        Codec::Int8 { block: 64 },
        Codec::TopK { fraction: 0.1 },
        Codec::TopKBf16 { fraction: 0.1 },
        Codec::TopKInt8 { fraction: 0.1 },
    ] {
        let bytes = c.encode(&v).unwrap();
        assert!(
            matches!(
                c.decode(&bytes[1..], 100),
                Err(CodecError::WrongLength { .. })
            ),
            "{c}"
        );
        assert!(
            matches!(c.decode(&bytes, 200), Err(CodecError::WrongLength { .. })),
            "{c}"
        );
    }
    // int8: a NaN scale, and the never-produced -128.
    let c = Codec::Int8 { block: 64 };
    let mut bytes = c.encode(&v).unwrap();
    bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(c.decode(&bytes, 100), Err(CodecError::Corrupt(_))));
    let mut bytes = c.encode(&v).unwrap();
    bytes[8] = 0x80;
    assert!(matches!(c.decode(&bytes, 100), Err(CodecError::Corrupt(_))));
    // A huge scale that overflows to infinity when multiplied out.
    let mut bytes = c.encode(&v).unwrap();
    bytes[..4].copy_from_slice(&f32::MAX.to_le_bytes());
    assert!(matches!(
        c.decode(&bytes, 100),
        Err(CodecError::NonFinite { .. })
    ));
    // top-k: indices out of order, out of range, wrong count.
    let c = Codec::TopK { fraction: 0.1 };
    let bytes = c.encode(&v).unwrap();
    let mut swapped = bytes.clone();
    swapped[4..8].copy_from_slice(&bytes[8..12]);
    swapped[8..12].copy_from_slice(&bytes[4..8]);
    assert!(matches!(
        c.decode(&swapped, 100),
        Err(CodecError::Corrupt(_))
    ));
    let mut far = bytes.clone();
    far[40..44].copy_from_slice(&1000u32.to_le_bytes());
    assert!(matches!(c.decode(&far, 100), Err(CodecError::Corrupt(_))));
    let mut count = bytes.clone();
    count[0] = 3;
    assert!(matches!(c.decode(&count, 100), Err(CodecError::Corrupt(_))));
    // Composed top-k: the value part is checked as its own codec would be.
    let c = Codec::TopKBf16 { fraction: 0.1 };
    let mut bytes = c.encode(&v).unwrap();
    // k = 10: 4 + 40 bytes of count and indices, then the first bf16 value.
    bytes[44..46].copy_from_slice(&0x7f80u16.to_le_bytes());
    assert!(matches!(
        c.decode(&bytes, 100),
        Err(CodecError::NonFinite { .. })
    ));
    let c = Codec::TopKInt8 { fraction: 0.1 };
    let mut bytes = c.encode(&v).unwrap();
    bytes[44..48].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(c.decode(&bytes, 100), Err(CodecError::Corrupt(_))));
    let mut bytes = c.encode(&v).unwrap();
    bytes[4..8].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(c.decode(&bytes, 100), Err(CodecError::Corrupt(_))));
    // bf16: an infinity.
    let mut bytes = Codec::Bf16.encode(&v).unwrap();
    bytes[0..2].copy_from_slice(&0x7f80u16.to_le_bytes());
    assert!(matches!(
        Codec::Bf16.decode(&bytes, 100),
        Err(CodecError::NonFinite { index: 0 })
    ));
}

#[test]
fn compression_ratios_are_what_the_table_says() {
    let n = 1_000_000;
    let f32_len = Codec::F32.encoded_len(n).unwrap() as f64;
    let ratio = |c: Codec| c.encoded_len(n).unwrap() as f64 / f32_len;
    assert_eq!(ratio(Codec::Bf16), 0.5);
    assert!((ratio(Codec::Int8 { block: 256 }) - (0.25 + 1.0 / 256.0)).abs() < 1e-5);
    assert!((ratio(Codec::TopK { fraction: 0.01 }) - 0.02).abs() < 1e-5);
    // 4 + 4k + 2k and 4 + 4k + k + 4 per 256 kept values, k = n / 100.
    assert!((ratio(Codec::TopKBf16 { fraction: 0.01 }) - 0.015).abs() < 1e-5);
    let int8 = 0.01 * (4.0 + 1.0 + 4.0 / 256.0) / 4.0;
    assert!((ratio(Codec::TopKInt8 { fraction: 0.01 }) - int8).abs() < 1e-5);
}
