//! Criterion benchmarks of the chunk store, side by side in one run:
//! ingest of 256 KiB chunks into sled with a flush per batch vs the same
//! bytes written as files with an fsync per batch, and verified reads from
//! the cache; reading manifests with and without their signature check, and
//! a garbage collection of a store holding 256 versions. Space amplification
//! is measured by `benches/space.rs`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tapestry_protocol::ContentId;
use tapestry_storage::{ChunkStore, MemoryStore, SledConfig, SledStore};

#[path = "../tests/common/mod.rs"]
mod common;

const CHUNK: usize = 256 << 10;
const BATCH: usize = 16;

/// A batch of fresh, never-seen chunks (so deduplication never kicks in).
fn fresh_batch(counter: &mut u64) -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|_| {
            *counter += 1;
            let mut x = *counter | 1;
            let mut c = vec![0u8; CHUNK];
            for word in c.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            c
        })
        .collect()
}

/// The baseline: one file per chunk named by its id, each fsynced, then the
/// directory fsynced: what "files with fsync per batch" costs.
fn write_files(dir: &Path, batch: &[Vec<u8>]) {
    let mut files = Vec::with_capacity(batch.len());
    for c in batch {
        let id = ContentId::of(c);
        let mut f = fs::File::create(dir.join(id.to_hex())).unwrap();
        f.write_all(c).unwrap();
        files.push(f);
    }
    for f in files {
        f.sync_all().unwrap();
    }
    fs::File::open(dir).unwrap().sync_all().unwrap();
}

fn ingest(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(
        std::env::var_os("TAPESTRY_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into),
    )
    .unwrap();
    let sled = SledStore::open(&tmp.path().join("sled"), &SledConfig::default()).unwrap();
    let files = tmp.path().join("files");
    fs::create_dir(&files).unwrap();
    let memory = MemoryStore::new();
    let mut counter = 0u64;

    let mut g = c.benchmark_group("ingest_16x256KiB");
    g.throughput(Throughput::Bytes((CHUNK * BATCH) as u64));
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    g.bench_function("sled_put_many_flush", |b| {
        b.iter_batched(
            || fresh_batch(&mut counter),
            |batch| {
                let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                sled.put_many(&refs).unwrap();
                sled.flush().unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("files_fsync", |b| {
        b.iter_batched(
            || fresh_batch(&mut counter),
            |batch| write_files(&files, &batch),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("memory_put_many", |b| {
        b.iter_batched(
            || fresh_batch(&mut counter),
            |batch| {
                let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                memory.put_many(&refs).unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn verified_reads(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(
        std::env::var_os("TAPESTRY_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into),
    )
    .unwrap();
    let sled = SledStore::open(&tmp.path().join("sled"), &SledConfig::default()).unwrap();
    let memory = MemoryStore::new();
    let mut counter = 1 << 40;
    // 16 MiB: fits the default cache (32 MiB per database).
    let mut ids = Vec::new();
    for _ in 0..4 {
        let batch = fresh_batch(&mut counter);
        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
        ids.extend(sled.put_many(&refs).unwrap());
        memory.put_many(&refs).unwrap();
    }
    sled.flush().unwrap();
    let mut g = c.benchmark_group("verified_read_64x256KiB");
    g.throughput(Throughput::Bytes((CHUNK * ids.len()) as u64));
    let stores: [(&str, &dyn ChunkStore); 2] = [("sled", &sled), ("memory", &memory)];
    for (name, store) in stores {
        g.bench_function(name, |b| {
            b.iter(|| {
                ids.iter()
                    .map(|id| store.get_verified(id).unwrap().unwrap().len())
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

/// A node's store at its retention steady state: 256 versions in a chain,
/// each with three deltas (int8, 1,000 parameters) and a 4 KiB payload, the
/// head a ref. Reads every manifest (with the signature check and without),
/// and collects garbage (which reads every manifest it keeps).
fn collection(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(
        std::env::var_os("TAPESTRY_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into),
    )
    .unwrap();
    let store = SledStore::open(&tmp.path().join("sled"), &SledConfig::default()).unwrap();
    let (mut versions, mut deltas) = (Vec::new(), Vec::new());
    let mut parent = Vec::new();
    for round in 0..256u64 {
        let ds: Vec<ContentId> = (0..3)
            .map(|k| common::put_delta(&store, round * 3 + k + 1, round).id())
            .collect();
        deltas.extend_from_slice(&ds);
        let v = common::put_version(&store, 1_000 + round, round, 4096, 4096, parent, ds);
        parent = vec![v.id()];
        versions.push(v.id());
    }
    store.set_ref("head", parent[0]).unwrap();
    store.flush().unwrap();
    // The first collection only starts a generation (module docs).
    store.gc_retaining(0, &[]).unwrap();

    let mut g = c.benchmark_group("manifests_256_versions_768_deltas");
    g.bench_function("load_verified", |b| {
        b.iter(|| {
            let v = versions
                .iter()
                .filter(|id| store.get_model_manifest(id).unwrap().is_some());
            let d = deltas
                .iter()
                .filter(|id| store.get_delta_manifest(id).unwrap().is_some());
            v.count() + d.count()
        })
    });
    g.bench_function("message_only", |b| {
        b.iter(|| {
            let v = versions
                .iter()
                .filter(|id| store.model_manifest_message(id).unwrap().is_some());
            let d = deltas
                .iter()
                .filter(|id| store.delta_manifest_message(id).unwrap().is_some());
            v.count() + d.count()
        })
    });
    g.bench_function("gc_retaining", |b| {
        b.iter(|| {
            let report = store.gc_retaining(0, &[]).unwrap();
            assert_eq!(report.manifests_kept, 1024);
            report
        })
    });
    g.finish();
}

criterion_group!(benches, ingest, verified_reads, collection);
criterion_main!(benches);
