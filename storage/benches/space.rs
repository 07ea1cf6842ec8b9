//! Space amplification of the sled store: store 1 GiB of 256 KiB chunks,
//! delete half of them (unpin + GC), and compare the bytes on disk with the
//! live bytes. A measurement, not a timing, so it prints its figures.
//!
//! `cargo bench -p tapestry-storage --bench space`
//! (`TAPESTRY_BENCH_DIR` picks the disk; `TAPESTRY_SPACE_MIB` the size.)

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Instant;

use tapestry_storage::{ChunkStore, SledConfig, SledStore};

/// Bytes this process has caused to be written to storage (Linux).
fn write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: ")?.trim().parse().ok())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list of tests.
    }
    let mib: usize = std::env::var("TAPESTRY_SPACE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let chunk = 256 << 10;
    let n = mib * 4;
    let tmp = tempfile::tempdir_in(
        std::env::var_os("TAPESTRY_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into),
    )
    .unwrap();
    let store = SledStore::open(&tmp.path().join("store"), &SledConfig::default()).unwrap();
    let started = Instant::now();
    let written_before = write_bytes();
    let mut ids = Vec::with_capacity(n);
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..n / 16 {
        let batch: Vec<Vec<u8>> = (0..16)
            .map(|_| {
                let mut c = vec![0u8; chunk];
                for w in c.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                c
            })
            .collect();
        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
        let new = store.put_many(&refs).unwrap();
        for id in &new {
            store.pin(*id).unwrap();
        }
        ids.extend(new);
        store.flush().unwrap();
    }
    let stored = (n * chunk) as u64;
    if let (Some(a), Some(b)) = (written_before, write_bytes()) {
        println!(
            "ingest wrote {} MiB to storage for {} MiB of chunks: write amplification {:.2}x",
            (b - a) >> 20,
            stored >> 20,
            (b - a) as f64 / stored as f64
        );
    }
    let full = store.disk_bytes().unwrap();
    println!(
        "stored {} MiB in {:.1} s; on disk {} MiB ({:.3}x)",
        stored >> 20,
        started.elapsed().as_secs_f64(),
        full >> 20,
        full as f64 / stored as f64
    );
    for id in ids.iter().step_by(2) {
        store.unpin(*id).unwrap();
    }
    // Two collections: the first only starts a new generation (module docs).
    store.gc().unwrap();
    let report = store.gc().unwrap();
    store.flush().unwrap();
    let live = stored - report.bytes_deleted;
    let after = store.disk_bytes().unwrap();
    println!(
        "deleted {} chunks ({} MiB); live {} MiB; on disk {} MiB: space amplification {:.3}x",
        report.chunks_deleted,
        report.bytes_deleted >> 20,
        live >> 20,
        after >> 20,
        after as f64 / live as f64
    );
    drop(store);
    let reopened = SledStore::open(&tmp.path().join("store"), &SledConfig::default()).unwrap();
    let settled = reopened.disk_bytes().unwrap();
    println!(
        "after close and reopen: on disk {} MiB: space amplification {:.3}x",
        settled >> 20,
        settled as f64 / live as f64
    );
}
