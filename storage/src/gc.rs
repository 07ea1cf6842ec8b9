//! Garbage collection: mark from the roots (refs, pins, what was written
//! since the previous collection began; parents followed down to the
//! retention horizon), then sweep every chunk and manifest not marked. See
//! the store's module docs for how writers and the sweep stay apart.

use std::collections::HashSet;

use tapestry_protocol::ContentId;

use crate::backend::KvOp;
use crate::error::StoreError;
use crate::store::{CHUNK, ChunkStore, GcReport, INDEX, MANIFEST, ManifestKind, id_from_key, key};

/// [`ChunkStore::gc_retaining`].
pub(crate) fn collect<S: ChunkStore + ?Sized>(
    store: &S,
    oldest_round: u64,
    keep: &[ContentId],
) -> Result<GcReport, StoreError> {
    let gate = store.gc_gate();
    let _one_at_a_time = gate.one_collection();
    // Start a new generation: what was written since the last collection
    // is a root of this one; what is written from now on is recorded anew.
    let previous: HashSet<ContentId> = {
        let _exclusive = gate.exclusive();
        std::mem::take(&mut *gate.written())
    };
    let mut live = HashSet::new();
    let roots = current_roots(store, keep)?;
    mark(
        store,
        roots.into_iter().chain(previous),
        oldest_round,
        &mut live,
    )?;

    let _exclusive = gate.exclusive();
    let since: Vec<ContentId> = gate.written().iter().copied().collect();
    let roots = current_roots(store, keep)?;
    mark(
        store,
        roots.into_iter().chain(since),
        oldest_round,
        &mut live,
    )?;

    let mut report = GcReport::default();
    let mut dead_chunks = Vec::new();
    store.kv_for_each(INDEX, &mut |k, v| {
        if let Some(id) = id_from_key(k) {
            let len = v.get(..4).map_or(0, |b| {
                u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            });
            if live.contains(&id) {
                report.chunks_kept += 1;
                report.bytes_kept += len;
            } else {
                report.bytes_deleted += len;
                dead_chunks.push(id);
            }
        }
        Ok(())
    })?;
    let mut dead_manifests = Vec::new();
    store.kv_for_each(MANIFEST, &mut |k, _| {
        if let Some(id) = id_from_key(k) {
            if live.contains(&id) {
                report.manifests_kept += 1;
            } else {
                dead_manifests.push(id);
            }
        }
        Ok(())
    })?;
    report.chunks_deleted = dead_chunks.len() as u64;
    report.manifests_deleted = dead_manifests.len() as u64;
    for batch in dead_chunks.chunks(256) {
        let ops = batch
            .iter()
            .flat_map(|id| {
                [
                    KvOp::Delete(key(CHUNK, id.as_bytes())),
                    KvOp::Delete(key(INDEX, id.as_bytes())),
                ]
            })
            .collect();
        store.kv_apply(ops)?;
    }
    for batch in dead_manifests.chunks(256) {
        store.kv_apply(
            batch
                .iter()
                .map(|id| KvOp::Delete(key(MANIFEST, id.as_bytes())))
                .collect(),
        )?;
    }
    drop(_exclusive);
    report.bytes_compacted = store.kv_compact()?;
    Ok(report)
}

fn current_roots<S: ChunkStore + ?Sized>(
    store: &S,
    keep: &[ContentId],
) -> Result<Vec<ContentId>, StoreError> {
    let mut roots: Vec<ContentId> = store.refs()?.into_iter().map(|(_, id)| id).collect();
    roots.extend_from_slice(keep);
    roots.extend(store.pins()?);
    Ok(roots)
}

/// Marks `roots` and everything they name as live.
fn mark<S: ChunkStore + ?Sized>(
    store: &S,
    roots: impl IntoIterator<Item = ContentId>,
    oldest_round: u64,
    live: &mut HashSet<ContentId>,
) -> Result<(), StoreError> {
    // (id, whether it is a root): roots are kept whatever their round.
    let mut stack: Vec<(ContentId, bool)> = roots.into_iter().map(|id| (id, true)).collect();
    while let Some((id, root)) = stack.pop() {
        if live.contains(&id) {
            continue;
        }
        // A corrupt manifest stops the collection: its chunks might be live.
        // Its id is checked, not its signature (checked when it was stored):
        // a collection reads every manifest it keeps, and one verification
        // each was most of its cost.
        match store.manifest_bytes(&id)? {
            None => {}
            Some((ManifestKind::Delta, _)) => {
                if let Some(m) = store.delta_manifest_message(&id)? {
                    live.extend(m.chunk_ids.iter().copied());
                }
            }
            Some((ManifestKind::Model, _)) => {
                if let Some(m) = store.model_manifest_message(&id)? {
                    if !root && m.round < oldest_round {
                        continue;
                    }
                    live.extend(m.chunk_ids.iter().copied());
                    stack.extend(m.parents.iter().map(|p| (*p, false)));
                    stack.extend(m.deltas.iter().map(|d| (*d, false)));
                }
            }
        }
        live.insert(id);
    }
    Ok(())
}
