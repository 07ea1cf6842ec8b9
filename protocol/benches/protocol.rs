//! Criterion benchmarks of the protocol's hot paths: BLAKE3 content ids,
//! signing and verifying manifests (one at a time and in batches of 64), and
//! the delta codecs on a 10-million-value vector. Figures go to BENCHMARKS.md.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tapestry_protocol::*;

fn key(seed: u8) -> Keypair {
    Keypair::from_secret_bytes(&[seed; 32])
}

/// A delta manifest for a model of `params` f32 parameters, int8-coded, in
/// 256 KiB chunks.
fn delta(author: &Keypair, params: u64) -> DeltaManifest {
    let codec = Codec::Int8 { block: 256 };
    let payload = codec.encoded_len(params as usize).unwrap() as u64;
    let chunk = DEFAULT_CHUNK_SIZE as u32;
    DeltaManifest {
        model_id: "bench".into(),
        region: "local".into(),
        round: 1,
        base_version: ContentId::of(b"base"),
        author: author.node_id(),
        seq: 1,
        codec,
        layout: vec![TensorSpec {
            name: "w".into(),
            shape: vec![params],
            dtype: DType::F32,
        }],
        payload_bytes: payload,
        chunk_size: chunk,
        chunk_ids: (0..payload.div_ceil(u64::from(chunk)))
            .map(|i| ContentId::of(&i.to_le_bytes()))
            .collect(),
        sample_count: 100,
        l2_norm: 1.0,
        created_unix_ms: 0,
    }
}

fn bench_blake3(c: &mut Criterion) {
    let mut g = c.benchmark_group("blake3");
    for size in [16 << 10, 256 << 10, 4 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, d| {
            b.iter(|| ContentId::of(black_box(d)))
        });
    }
    g.finish();
}

fn bench_signatures(c: &mut Criterion) {
    let mut g = c.benchmark_group("signature");
    let k = key(1);
    // 10 thousand parameters (one chunk) and 1 billion (3,800 chunks, a
    // 135 KB manifest): the delta is 100,000 times larger.
    for (label, params) in [
        ("delta_10k_params", 10_000u64),
        ("delta_1g_params", 1_000_000_000),
    ] {
        let m = delta(&k, params);
        let signed = Signed::sign(m.clone(), &k).unwrap();
        let bytes = signed.envelope_bytes().to_vec();
        eprintln!("{label}: manifest envelope {} bytes", bytes.len());
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("sign", label), |b| {
            b.iter_batched(
                || m.clone(),
                |m| Signed::sign(m, &k).unwrap(),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(BenchmarkId::new("verify_strict", label), |b| {
            b.iter_batched(
                || Signed::<DeltaManifest>::parse(bytes.clone()).unwrap(),
                |s| s.verify().unwrap(),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(BenchmarkId::new("open", label), |b| {
            b.iter(|| Signed::<DeltaManifest>::open(black_box(&bytes)).unwrap())
        });
    }
    // Where single verification spends its time.
    let signed = Signed::sign(delta(&k, 10_000), &k).unwrap();
    let (tag, body, signer, sig): (String, serde_bytes::ByteBuf, [u8; 32], serde_bytes::ByteBuf) =
        ciborium::de::from_reader(signed.envelope_bytes()).unwrap();
    let _ = tag;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&signer).unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    let digest = tapestry_protocol::signed::signing_digest(DeltaManifest::DOMAIN_TAG, &body);
    g.throughput(Throughput::Elements(1));
    g.bench_function("parts/decompress_key", |b| {
        b.iter(|| ed25519_dalek::VerifyingKey::from_bytes(black_box(&signer)).unwrap())
    });
    g.bench_function("parts/dalek_verify_strict", |b| {
        b.iter(|| {
            vk.verify_strict(black_box(&digest), black_box(&sig))
                .unwrap()
        })
    });
    g.bench_function("parts/decode_and_validate_body", |b| {
        b.iter(|| {
            let m: DeltaManifest =
                tapestry_protocol::cbor::from_cbor(black_box(&body), &DecodeLimits::MANIFEST)
                    .unwrap();
            m.validate(&k.node_id()).unwrap();
            m
        })
    });

    // 64 manifests by 64 authors: batch vs one at a time, same inputs.
    let envelopes: Vec<Vec<u8>> = (0..64)
        .map(|i| {
            let k = key(i);
            Signed::sign(delta(&k, 10_000), &k)
                .unwrap()
                .envelope_bytes()
                .to_vec()
        })
        .collect();
    let parse_all = || {
        envelopes
            .iter()
            .map(|b| Signed::<DeltaManifest>::parse(b.clone()).unwrap())
            .collect::<Vec<_>>()
    };
    g.throughput(Throughput::Elements(64));
    g.bench_function("verify_64_one_by_one", |b| {
        b.iter_batched(
            parse_all,
            |all| {
                all.into_iter()
                    .map(|s| s.verify())
                    .filter(Result::is_ok)
                    .count()
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("verify_64_batch", |b| {
        b.iter_batched(
            parse_all,
            |all| verify_batch(all).into_iter().filter(Result::is_ok).count(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_codecs(c: &mut Criterion) {
    const N: usize = 10_000_000;
    // A deterministic, roughly Gaussian vector (sum of uniforms), like a delta.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let values: Vec<f32> = (0..N)
        .map(|_| (uniform() + uniform() + uniform()) * 0.01)
        .collect();
    let mut g = c.benchmark_group("codec_10m");
    g.sample_size(10).measurement_time(Duration::from_secs(6));
    g.throughput(Throughput::Bytes((N * 4) as u64));
    for codec in [
        Codec::F32,
        Codec::Bf16,
        Codec::Int8 { block: 256 },
        Codec::TopK { fraction: 0.01 },
    ] {
        let encoded = codec.encode(&values).unwrap();
        eprintln!(
            "{codec}: {} bytes for {N} values, {:.4} of f32",
            encoded.len(),
            encoded.len() as f64 / (N * 4) as f64
        );
        g.bench_function(BenchmarkId::new("encode", codec.to_string()), |b| {
            b.iter(|| codec.encode(black_box(&values)).unwrap())
        });
        g.bench_function(BenchmarkId::new("decode", codec.to_string()), |b| {
            b.iter(|| codec.decode(black_box(&encoded), N).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_blake3, bench_signatures, bench_codecs);
criterion_main!(benches);
