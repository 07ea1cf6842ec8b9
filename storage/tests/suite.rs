//! One test suite, run against both backends (`memory::*` and `sled::*`).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use tapestry_protocol::*;
use tapestry_storage::*;

/// Writes `bad` under chunk `id`, as a failing disk would (bypassing `put`).
fn corrupt_chunk(store: &dyn ChunkStore, id: &ContentId, bad: &[u8]) {
    let mut k = vec![b'c'];
    k.extend_from_slice(id.as_bytes());
    store.kv_apply(vec![KvOp::Put(k, bad)]).unwrap();
}

fn put_get_has_and_dedup(s: &dyn ChunkStore) {
    let a = bytes(1, 300_000);
    let id = s.put(&a).unwrap();
    assert_eq!(id, ContentId::of(&a));
    assert!(s.has(&id).unwrap());
    assert_eq!(&*s.get(&id).unwrap().unwrap(), &a[..]);
    assert_eq!(&*s.get_verified(&id).unwrap().unwrap(), &a[..]);
    assert_eq!(s.put(&a).unwrap(), id);
    assert_eq!(s.chunk_ids().unwrap(), vec![id]);
    let missing = ContentId::of(b"nothing");
    assert!(!s.has(&missing).unwrap());
    assert!(s.get(&missing).unwrap().is_none());
    assert!(s.get_verified(&missing).unwrap().is_none());
}

fn put_checked_stores_under_the_given_id(s: &dyn ChunkStore) {
    let a = bytes(7, 70_000);
    let id = ContentId::of(&a);
    s.put_checked(id, &a).unwrap();
    assert!(s.has(&id).unwrap());
    assert_eq!(&*s.get_verified(&id).unwrap().unwrap(), &a[..]);
    // Again: stored once.
    s.put_checked(id, &a).unwrap();
    assert_eq!(s.chunk_ids().unwrap(), vec![id]);
}

fn put_many_is_one_batch_in_order(s: &dyn ChunkStore) {
    let chunks: Vec<Vec<u8>> = (0..10).map(|i| bytes(i, 1000 + i as usize)).collect();
    let mut refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    refs.push(&chunks[3]); // a duplicate inside the batch
    let ids = s.put_many(&refs).unwrap();
    assert_eq!(ids.len(), 11);
    for (id, c) in ids.iter().zip(&refs) {
        assert_eq!(*id, ContentId::of(c));
        assert_eq!(&*s.get_verified(id).unwrap().unwrap(), *c);
    }
    assert_eq!(ids[10], ids[3]);
    assert_eq!(s.chunk_ids().unwrap().len(), 10);
}

fn payload_round_trip_is_bit_exact(s: &dyn ChunkStore) {
    // f32 bit patterns of every kind, NaN payloads and negative zero included.
    let bits = bytes(7, 1_000_003 * 4);
    let values: Vec<f32> = bits
        .chunks_exact(4)
        .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for chunk_size in [MIN_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, 100_000] {
        let ids = s.put_payload(&payload, chunk_size).unwrap();
        assert_eq!(ids.len(), payload.len().div_ceil(chunk_size));
        let back = s.read_payload(&ids, payload.len() as u64).unwrap();
        let back_values: Vec<u32> = back
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(
            back_values
                .iter()
                .zip(&values)
                .all(|(a, b)| *a == b.to_bits())
        );
        assert!(matches!(
            s.read_payload(&ids, payload.len() as u64 + 1),
            Err(StoreError::WrongLength { .. })
        ));
    }
    assert!(matches!(
        s.put_payload(&payload, 100),
        Err(StoreError::BadChunkSize(100))
    ));
    let absent = [ContentId::of(b"absent")];
    assert!(matches!(
        s.read_payload(&absent, 6),
        Err(StoreError::NotFound { .. })
    ));
}

fn verified_read_refuses_corrupt_bytes(s: &dyn ChunkStore) {
    let good = bytes(3, 5000);
    let id = s.put(&good).unwrap();
    let mut bad = good.clone();
    bad[1234] ^= 0x10;
    corrupt_chunk(s, &id, &bad);
    assert!(matches!(
        s.get_verified(&id),
        Err(StoreError::Corrupt { what: "chunk", .. })
    ));
    // Quarantined: no longer present, never served, and can be fetched again.
    assert!(!s.has(&id).unwrap());
    assert!(s.get_verified(&id).unwrap().is_none());
    assert_eq!(s.quarantined().unwrap(), vec![id]);
    assert_eq!(s.put(&good).unwrap(), id);
    assert_eq!(&*s.get_verified(&id).unwrap().unwrap(), &good[..]);
}

fn manifests_round_trip_and_lineage(s: &dyn ChunkStore) {
    let d1 = put_delta(s, 1, 1);
    let d2 = put_delta(s, 2, 1);
    let v0 = put_version(s, 10, 0, 40_000, 16384, vec![], vec![]);
    let v1 = put_version(
        s,
        11,
        1,
        40_000,
        16384,
        vec![v0.id()],
        vec![d1.id(), d2.id()],
    );
    let absent_parent = ContentId::of(b"a version we never fetched");
    let v2 = put_version(
        s,
        12,
        2,
        40_000,
        16384,
        vec![v1.id(), absent_parent],
        vec![d1.id()],
    );

    let got = s.get_delta_manifest(&d1.id()).unwrap().unwrap();
    assert_eq!(got.message(), d1.message());
    assert_eq!(got.envelope_bytes(), d1.envelope_bytes());
    let got = s.get_model_manifest(&v1.id()).unwrap().unwrap();
    assert_eq!(got.message(), v1.message());
    // The message alone, without the signature check, is the same message.
    let cheap = s.model_manifest_message(&v1.id()).unwrap().unwrap();
    assert_eq!(&cheap, v1.message());
    let cheap = s.delta_manifest_message(&d1.id()).unwrap().unwrap();
    assert_eq!(&cheap, d1.message());
    assert!(matches!(
        s.model_manifest_message(&d1.id()),
        Err(StoreError::BadManifest { .. })
    ));
    let (kind, raw) = s.manifest_bytes(&d2.id()).unwrap().unwrap();
    assert_eq!(kind, ManifestKind::Delta);
    assert_eq!(&*raw, d2.envelope_bytes());
    // Asking for the wrong kind is an error, not a misread.
    assert!(matches!(
        s.get_model_manifest(&d1.id()),
        Err(StoreError::BadManifest { .. })
    ));
    assert!(
        s.get_delta_manifest(&ContentId::of(b"x"))
            .unwrap()
            .is_none()
    );

    let lineage = s.lineage(v2.id(), 100).unwrap();
    assert_eq!(lineage.versions, vec![v2.id(), v1.id(), v0.id()]);
    assert_eq!(lineage.deltas, vec![d1.id(), d2.id()]);
    assert_eq!(lineage.missing_versions, vec![absent_parent]);
    assert_eq!(s.lineage(v2.id(), 1).unwrap().versions, vec![v2.id()]);
}

fn refs_point_only_at_complete_versions(s: &dyn ChunkStore) {
    let v = put_version(s, 20, 1, 50_000, 4096, vec![], vec![]);
    s.set_ref("test/local/head", v.id()).unwrap();
    assert_eq!(s.get_ref("test/local/head").unwrap(), Some(v.id()));

    // A version with a chunk missing cannot become a ref's target.
    let w = put_version(s, 21, 2, 50_000, 4096, vec![v.id()], vec![]);
    let victim = w.message().chunk_ids[3];
    corrupt_chunk(s, &victim, b"rot");
    assert!(s.get_verified(&victim).is_err());
    match s.set_ref("test/local/head", w.id()) {
        Err(StoreError::Incomplete {
            version,
            missing: 1,
            first,
        }) => {
            assert_eq!(version, w.id());
            assert_eq!(first, victim);
        }
        other => panic!("expected Incomplete, got {other:?}"),
    }
    assert_eq!(
        s.get_ref("test/local/head").unwrap(),
        Some(v.id()),
        "ref unchanged"
    );
    assert!(matches!(
        s.set_ref("test/local/head", ContentId::of(b"no such version")),
        Err(StoreError::NotFound { .. })
    ));

    // Compare-and-swap.
    let x = put_version(s, 22, 3, 8000, 4096, vec![v.id()], vec![]);
    assert!(
        !s.swap_ref("test/local/head", Some(Some(x.id())), x.id())
            .unwrap()
    );
    assert!(
        s.swap_ref("test/local/head", Some(Some(v.id())), x.id())
            .unwrap()
    );
    assert!(s.swap_ref("other", Some(None), x.id()).unwrap());
    assert!(!s.swap_ref("other", Some(None), v.id()).unwrap());
    assert_eq!(
        s.refs().unwrap(),
        vec![
            ("other".to_owned(), x.id()),
            ("test/local/head".to_owned(), x.id())
        ]
    );
    s.delete_ref("other").unwrap();
    assert_eq!(s.get_ref("other").unwrap(), None);
    for bad in ["", "a b", "ünicode", &"x".repeat(201)] {
        assert!(matches!(
            s.set_ref(bad, x.id()),
            Err(StoreError::InvalidRefName(_))
        ));
    }
}

fn gc_keeps_the_reachable_and_sweeps_the_rest(s: &dyn ChunkStore) {
    let d = put_delta(s, 30, 1);
    let v0 = put_version(s, 31, 0, 20_000, 4096, vec![], vec![]);
    let v1 = put_version(s, 32, 1, 20_000, 4096, vec![v0.id()], vec![d.id()]);
    s.set_ref("head", v1.id()).unwrap();
    let pinned = s.put(&bytes(33, 7000)).unwrap();
    s.pin(pinned).unwrap();
    let orphan_version = put_version(s, 34, 5, 20_000, 4096, vec![], vec![]);
    let garbage = s.put(&bytes(35, 9000)).unwrap();

    // Everything was written since the last collection: all of it survives one.
    let first = s.gc().unwrap();
    assert_eq!(first.chunks_deleted, 0);
    assert!(s.has(&garbage).unwrap());
    // The second collection sweeps what nothing references.
    let second = s.gc().unwrap();
    assert!(!s.has(&garbage).unwrap());
    assert!(
        s.get_model_manifest(&orphan_version.id())
            .unwrap()
            .is_none()
    );
    assert!(
        orphan_version
            .message()
            .chunk_ids
            .iter()
            .all(|c| !s.has(c).unwrap())
    );
    assert_eq!(
        second.chunks_deleted,
        1 + orphan_version.message().chunk_ids.len() as u64
    );
    assert_eq!(second.manifests_deleted, 1);
    assert_eq!(second.bytes_deleted, 9000 + 20_000);
    // Reachable: the ref's version, its parent, its delta, all their chunks, the pin.
    assert!(version_complete(s, &v1.id()));
    assert!(version_complete(s, &v0.id()));
    let dm = s.get_delta_manifest(&d.id()).unwrap().unwrap();
    s.read_payload(&dm.message().chunk_ids, dm.message().payload_bytes)
        .unwrap();
    assert!(s.has(&pinned).unwrap());
    // Unpinning and dropping the ref makes them collectable (after a cycle).
    s.unpin(pinned).unwrap();
    s.delete_ref("head").unwrap();
    s.gc().unwrap();
    s.gc().unwrap();
    assert!(s.chunk_ids().unwrap().is_empty());
    assert!(s.get_model_manifest(&v1.id()).unwrap().is_none());
}

fn gc_with_a_horizon_keeps_the_head_and_its_latest_ancestors(s: &dyn ChunkStore) {
    // A line of six versions, each aggregating one delta.
    let mut versions = vec![put_version(s, 40, 0, 8_000, 4096, vec![], vec![])];
    let mut deltas = Vec::new();
    for round in 1..6u64 {
        let d = put_delta(s, 50 + round, round);
        let parent = versions.last().map(|v| v.id()).unwrap();
        let v = put_version(
            s,
            40 + round,
            round,
            8_000,
            4096,
            vec![parent],
            vec![d.id()],
        );
        deltas.push(d);
        versions.push(v);
    }
    s.set_ref("head", versions[5].id()).unwrap();
    // A delta no version names yet, kept for this collection by the caller.
    let waiting = put_delta(s, 70, 6);
    s.gc_retaining(3, &[waiting.id()]).unwrap();
    let report = s.gc_retaining(3, &[waiting.id()]).unwrap();
    let wm = s.get_delta_manifest(&waiting.id()).unwrap().unwrap();
    s.read_payload(&wm.message().chunk_ids, wm.message().payload_bytes)
        .unwrap();
    // The head and its ancestors from round 3 on stay whole, with their deltas.
    for v in &versions[3..] {
        assert!(version_complete(s, &v.id()), "round {}", v.message().round);
    }
    for d in &deltas[2..] {
        assert!(s.get_delta_manifest(&d.id()).unwrap().is_some());
    }
    // Older history is gone, chunks and deltas included.
    for v in &versions[..3] {
        assert!(s.get_model_manifest(&v.id()).unwrap().is_none());
        assert!(v.message().chunk_ids.iter().all(|c| !s.has(c).unwrap()));
    }
    for d in &deltas[..2] {
        assert!(s.get_delta_manifest(&d.id()).unwrap().is_none());
    }
    assert_eq!(report.manifests_kept, 3 + 3 + 1);
    let kept: u64 = versions[3..]
        .iter()
        .map(|v| v.message().payload_bytes)
        .chain(deltas[2..].iter().map(|d| d.message().payload_bytes))
        .chain([wm.message().payload_bytes])
        .sum();
    assert_eq!(report.bytes_kept, kept);
}

fn gc_during_writes_never_loses_a_ref_target(s: &dyn ChunkStore) {
    // One thread builds versions and moves the head to each; another
    // collects garbage the whole time. Every set_ref must succeed (GC never
    // took a chunk that was just written) and the head is always readable.
    //
    // What the collector guarantees: it keeps what was written since the
    // previous collection began, so a write must reach its ref within one
    // collection cycle (real nodes collect every few minutes). The pause
    // below keeps the cycle well above a version's write time even on a
    // loaded machine.
    let stop = AtomicBool::new(false);
    let rounds = 60u64;
    /// Stops the collector however the writer ends (a failed assertion in
    /// the writer must fail the test, not leave the collector spinning).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let gcs = std::thread::scope(|scope| {
        let collector = scope.spawn(|| {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                s.gc().unwrap();
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            n
        });
        let _stop = StopOnDrop(&stop);
        for round in 0..rounds {
            // No parents: every older version becomes garbage.
            let v = put_version(s, 1000 + round, round, 30_000, 4096, vec![], vec![]);
            s.set_ref("head", v.id()).unwrap();
            assert!(version_complete(s, &v.id()));
        }
        stop.store(true, Ordering::Relaxed);
        collector.join().unwrap()
    });
    assert!(gcs >= 2, "the collector ran {gcs} times");
    let head = s.get_ref("head").unwrap().unwrap();
    s.gc().unwrap();
    s.gc().unwrap();
    assert!(version_complete(s, &head));
    // Only the head's chunks are left.
    let m = s.get_model_manifest(&head).unwrap().unwrap();
    let mut live: Vec<ContentId> = m.message().chunk_ids.clone();
    live.sort();
    live.dedup();
    assert_eq!(s.chunk_ids().unwrap(), live);
    assert!(s.scrub().unwrap().is_clean());
}

fn scrub_finds_and_quarantines_corruption(s: &dyn ChunkStore) {
    let v = put_version(s, 40, 1, 30_000, 4096, vec![], vec![]);
    s.set_ref("head", v.id()).unwrap();
    let clean = s.scrub().unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.chunks_checked, 8);
    assert_eq!(clean.bytes_checked, 30_000);
    assert_eq!(clean.manifests_checked, 1);

    let victim = v.message().chunk_ids[2];
    corrupt_chunk(s, &victim, &bytes(99, 4096));
    let report = s.scrub().unwrap();
    assert_eq!(report.corrupt_chunks, vec![victim]);
    assert_eq!(report.incomplete_refs, vec![("head".to_owned(), v.id(), 1)]);
    assert!(!s.has(&victim).unwrap());
    assert!(s.get_verified(&victim).unwrap().is_none());
    assert_eq!(s.quarantined().unwrap(), vec![victim]);

    // A corrupt manifest record is found as well.
    let mut k = vec![b'm'];
    k.extend_from_slice(v.id().as_bytes());
    let mut rotten = vec![2u8];
    rotten.extend_from_slice(v.envelope_bytes());
    let last = rotten.len() - 1;
    rotten[last] ^= 1;
    s.kv_apply(vec![KvOp::Put(k.clone(), &rotten)]).unwrap();
    // Read without the signature check, it is still refused (its id does
    // not match) and quarantined.
    assert!(matches!(
        s.model_manifest_message(&v.id()),
        Err(StoreError::Corrupt { .. })
    ));
    s.kv_apply(vec![KvOp::Put(k, &rotten)]).unwrap();
    let report = s.scrub().unwrap();
    assert_eq!(report.corrupt_manifests, vec![v.id()]);
    assert!(s.get_model_manifest(&v.id()).unwrap().is_none());
}

macro_rules! suite {
    ($($t:ident),* $(,)?) => {
        mod memory {
            $(#[test] fn $t() { super::$t(&tapestry_storage::MemoryStore::new()) })*
        }
        mod sled {
            $(#[test] fn $t() {
                let dir = tempfile::tempdir().unwrap();
                let store = tapestry_storage::SledStore::open(
                    &dir.path().join("store"),
                    &tapestry_storage::SledConfig::default(),
                ).unwrap();
                super::$t(&store)
            })*
        }
    };
}

suite!(
    put_get_has_and_dedup,
    put_checked_stores_under_the_given_id,
    put_many_is_one_batch_in_order,
    payload_round_trip_is_bit_exact,
    verified_read_refuses_corrupt_bytes,
    manifests_round_trip_and_lineage,
    refs_point_only_at_complete_versions,
    gc_keeps_the_reachable_and_sweeps_the_rest,
    gc_with_a_horizon_keeps_the_head_and_its_latest_ancestors,
    gc_during_writes_never_loses_a_ref_target,
    scrub_finds_and_quarantines_corruption,
);

#[test]
fn the_store_is_usable_as_a_trait_object() {
    let s: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
    let id = s.put(b"hello").unwrap();
    assert!(s.has(&id).unwrap());
}
