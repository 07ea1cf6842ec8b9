//! Fetching chunks and payloads from peers into the store, bounded and
//! in parallel, and writing small files atomically.

use super::*;

/// Provider records this node keeps in the DHT: its own recent deltas and
/// versions. (It serves what it fetched too, to whoever asks, but does not
/// advertise it.)
pub(super) const MAX_PROVIDED: usize = 256;

/// Chunk fetches in flight at once for one payload.
pub(super) const PARALLEL_FETCHES: usize = 8;

/// Fetches the chunks of `ids` not yet in the store, several at once, each
/// from `providers` in turn (starting at a different one per chunk, so the
/// load spreads), checking each against its id before storing it. A peer
/// that serves a wrong chunk is not asked again. Between attempts (with
/// backoff) the DHT is asked who else provides `content`.
pub(super) async fn fetch_chunks(
    net: &NetHandle,
    store: &Store,
    content: ContentId,
    ids: &[ContentId],
    providers: &[PeerId],
    shared: &Shared,
) -> bool {
    use futures::StreamExt;
    let bad = Mutex::new(BTreeSet::<PeerId>::new());
    let mut providers: Vec<PeerId> = providers.to_vec();
    let mut missing: Vec<ContentId> = ids
        .iter()
        .filter(|id| !store.has(id).unwrap_or(false))
        .copied()
        .collect();
    for attempt in 0..4u32 {
        if missing.is_empty() {
            return true;
        }
        let order = &providers;
        let bad = &bad;
        let failed: Vec<ContentId> = futures::stream::iter(missing.clone().into_iter().enumerate())
            .map(|(k, id)| async move {
                let n = order.len().max(1);
                for step in 0..order.len() {
                    let peer = order[(k + step) % n];
                    if bad.lock().map(|b| b.contains(&peer)).unwrap_or(false) {
                        continue;
                    }
                    match net.fetch(peer, FetchRequest::Chunk(id)).await {
                        Ok(FetchResponse::Chunk(bytes)) if ContentId::of(&bytes) == id => {
                            shared.metrics.chunks_fetched.inc();
                            shared.metrics.bytes_in.inc_by(bytes.len() as u64);
                            if store.put(&bytes).is_ok() {
                                return None;
                            }
                        }
                        Ok(FetchResponse::Chunk(_)) => {
                            tracing::warn!(%peer, chunk = %id.short(), "peer served a corrupt chunk");
                            shared.metrics.reject("corrupt_chunk");
                            if let Ok(mut b) = bad.lock() {
                                b.insert(peer);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(%peer, error = %e, "chunk fetch failed"),
                    }
                }
                Some(id)
            })
            .buffer_unordered(PARALLEL_FETCHES)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        missing = failed;
        if missing.is_empty() {
            return true;
        }
        // Who else has it?
        if let Ok(more) = net.providers(content).await {
            for p in more {
                if p != net.peer_id() && !providers.contains(&p) {
                    providers.push(p);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    missing.is_empty()
}

/// Writes `data` to `path` so that a crash leaves the old or the new
/// contents, never a mix: a temporary file beside it, synced, renamed over.
pub(super) fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub(super) async fn fetch_payload(
    net: &NetHandle,
    store: &Store,
    manifest: &Verified<DeltaManifest>,
    providers: &[PeerId],
    shared: &Shared,
) -> Option<Vec<u8>> {
    let m = manifest.message();
    if !fetch_chunks(net, store, manifest.id(), &m.chunk_ids, providers, shared).await {
        return None;
    }
    store.put_delta_manifest(manifest).ok()?;
    store.read_payload(&m.chunk_ids, m.payload_bytes).ok()
}
