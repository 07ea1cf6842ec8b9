//! Fetching chunks and payloads from peers, bounded and in parallel: into
//! the store (a head's lost chunk files), or into memory (a delta's
//! payload, gossiped or named by a version being verified: stored only
//! once it passes the door); and writing small files atomically.

use super::*;

/// Provider records this node keeps in the DHT: its own recent deltas and
/// versions. (It serves what it fetched too, to whoever asks, but does not
/// advertise it.)
pub(super) const MAX_PROVIDED: usize = 256;

/// Chunk fetches in flight at once for one payload.
pub const PARALLEL_FETCHES: usize = 8;

/// Fetches the chunks of `ids` not yet in the store into it, several at
/// once, each checked against its id (see `fetch_into`); whether all are
/// there at the end. `content` is what the DHT is asked providers of
/// when `providers` fail. (Public for the transfer bench.)
pub async fn fetch_chunks(
    net: &NetHandle,
    store: &Store,
    content: ContentId,
    ids: &[ContentId],
    providers: &[PeerId],
    shared: &Shared,
) -> bool {
    fetch_into(
        net,
        content,
        ids,
        providers,
        shared,
        &|id| store.has(id).unwrap_or(false),
        &|bytes| store.put(bytes).is_ok(),
    )
    .await
}

/// Fetches again the chunks of `ids` whose bytes the store lost (a chunk
/// file deleted from under it), from `providers`; returns how many were
/// missing, and whether all are back.
pub(super) async fn refetch_lost(
    net: &NetHandle,
    store: &Store,
    content: ContentId,
    ids: &[ContentId],
    providers: &[PeerId],
    shared: &Shared,
) -> (usize, bool) {
    let lost = |id: &ContentId| !store.has_bytes(id).unwrap_or(true);
    let missing = ids.iter().filter(|id| lost(id)).count();
    if missing == 0 {
        return (0, true);
    }
    let back = fetch_into(
        net,
        content,
        ids,
        providers,
        shared,
        &|id| !lost(id),
        &|bytes| store.put(bytes).is_ok(),
    )
    .await;
    (missing, back)
}

/// Fetches the chunks of `ids` that `have` says are missing, several at
/// once, each from `providers` in turn (starting at a different one per
/// chunk, so the load spreads), checking each against its id before
/// handing it to `keep`. A peer that serves a wrong chunk is not asked
/// again. Between attempts (with backoff) the DHT is asked who else
/// provides `content`.
async fn fetch_into(
    net: &NetHandle,
    content: ContentId,
    ids: &[ContentId],
    providers: &[PeerId],
    shared: &Shared,
    have: &(dyn Fn(&ContentId) -> bool + Sync),
    keep: &(dyn Fn(&[u8]) -> bool + Sync),
) -> bool {
    use futures::StreamExt;
    let bad = Mutex::new(BTreeSet::<PeerId>::new());
    let mut providers: Vec<PeerId> = providers.to_vec();
    let mut missing: Vec<ContentId> = ids.iter().filter(|id| !have(id)).copied().collect();
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
                            if keep(&bytes) {
                                return None;
                            }
                        }
                        Ok(FetchResponse::Chunk(_)) => {
                            tracing::warn!(%peer, chunk = %id.short(), "peer served a corrupt chunk");
                            shared.metrics.reject("corrupt_chunk");
                            net.fault(peer);
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

/// A gossiped delta's payload, fetched into memory (chunks the store
/// already holds are read from it): it is stored only once the engine
/// admits it (see [`Node::keep_delta`]).
pub(super) async fn fetch_payload(
    net: &NetHandle,
    store: &Store,
    manifest: &Verified<DeltaManifest>,
    providers: &[PeerId],
    shared: &Shared,
) -> Option<Vec<u8>> {
    let chunks = fetch_payload_chunks(net, store, manifest, providers, shared).await?;
    let m = manifest.message();
    let mut payload = Vec::with_capacity(usize::try_from(m.payload_bytes).ok()?);
    for c in &chunks {
        payload.extend_from_slice(c);
    }
    (payload.len() as u64 == m.payload_bytes).then_some(payload)
}

/// A delta's chunks, fetched into memory in the manifest's order (chunks
/// the store already holds are read from it), each checked against its
/// id; `None` if some chunk could not be had or their lengths do not add
/// up to the declared payload size.
pub(super) async fn fetch_payload_chunks(
    net: &NetHandle,
    store: &Store,
    manifest: &Verified<DeltaManifest>,
    providers: &[PeerId],
    shared: &Shared,
) -> Option<Vec<Vec<u8>>> {
    let m = manifest.message();
    let got: Mutex<HashMap<ContentId, Vec<u8>>> = Mutex::default();
    let held = |id: &ContentId| -> Option<Vec<u8>> {
        store.get_verified(id).ok().flatten().map(|b| b.to_vec())
    };
    for id in &m.chunk_ids {
        if let Some(b) = held(id)
            && let Ok(mut g) = got.lock()
        {
            g.insert(*id, b);
        }
    }
    let fetched = fetch_into(
        net,
        manifest.id(),
        &m.chunk_ids,
        providers,
        shared,
        &|id| got.lock().map(|g| g.contains_key(id)).unwrap_or(false),
        &|bytes| {
            got.lock()
                .map(|mut g| g.insert(ContentId::of(bytes), bytes.to_vec()))
                .is_ok()
        },
    )
    .await;
    if !fetched {
        return None;
    }
    let got = got.into_inner().ok()?;
    let chunks: Vec<Vec<u8>> = m
        .chunk_ids
        .iter()
        .map(|id| got.get(id).cloned())
        .collect::<Option<_>>()?;
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    (total == m.payload_bytes).then_some(chunks)
}

impl Node {
    /// Checks that the head's chunks are all on disk; any whose file was
    /// lost is fetched again from the region's members (on its own task).
    pub(super) fn check_head_chunks(&mut self) {
        let Some(head) = self.shared.head.lock().ok().and_then(|h| h.clone()) else {
            return;
        };
        let (net, store, shared) = (self.net.clone(), self.store.clone(), self.shared.clone());
        let providers: Vec<PeerId> = self.members.iter().copied().collect();
        self.tasks.spawn(async move {
            let m = head.message();
            let (missing, back) =
                refetch_lost(&net, &store, head.id(), &m.chunk_ids, &providers, &shared).await;
            if missing == 0 {
                return;
            }
            if back {
                tracing::warn!(missing, version = %head.id().short(), "chunk files of the head were lost; fetched again from peers");
                shared.metrics.chunks_refetched.inc_by(missing as u64);
                let _ = store.flush();
            } else {
                tracing::error!(missing, version = %head.id().short(), "chunk files of the head were lost and no peer served them (tapestry scrub tells what else is lost)");
            }
        });
    }

    /// A gossiped delta's payload arrived: the engine checks it at its
    /// door; only if it admits it are its chunks and manifest stored (on a
    /// blocking thread), so what fails the door never reaches the disk.
    pub(super) async fn on_fetched(&mut self, manifest: Verified<DeltaManifest>, payload: Vec<u8>) {
        let id = manifest.id();
        self.feed(Input::DeltaPayload {
            id,
            payload: payload.clone(),
        })
        .await;
        if !self.engine.holds_delta(&id) || !self.room_for(payload.len()) {
            return;
        }
        let (store, shared) = (self.store.clone(), self.shared.clone());
        tokio::task::spawn_blocking(move || {
            let chunk_size = manifest.message().chunk_size as usize;
            let kept = store
                .put_payload(&payload, chunk_size)
                .and_then(|_| store.put_delta_manifest(&manifest));
            if let Err(e) = kept {
                tracing::warn!(error = %e, delta = %id.short(), "cannot store an admitted delta");
                space::note_failure(&shared, &e);
            }
        });
    }
}
