//! Answering peers' requests. Heads and attestations come from the node's
//! state on its loop (cheap); chunks and manifests are read (and chunks
//! hashed) on blocking threads, at most [`MAX_SERVING`] at once and
//! [`MAX_SERVING_PER_PEER`] for one peer: past that the answer is `Busy`,
//! counted, and the peer asks again later or elsewhere. In a permissioned
//! region, outsiders get nothing.

use std::collections::HashMap;

use libp2p::request_response::ResponseChannel;

use super::*;

/// Chunk and manifest reads in flight at once, for all peers.
pub(super) const MAX_SERVING: usize = 256;
/// Chunk and manifest reads in flight at once for one peer.
pub(super) const MAX_SERVING_PER_PEER: usize = 64;

/// Reads in flight, in total and per peer (a peer's entry goes when its
/// last read ends, so the map holds at most [`MAX_SERVING`] peers).
#[derive(Debug, Default, Clone)]
pub(super) struct Serving(Arc<Mutex<(usize, HashMap<PeerId, usize>)>>);

/// One read in flight; ends when dropped.
pub(super) struct Slot {
    serving: Serving,
    peer: PeerId,
}

impl Serving {
    /// A slot for `peer`, if neither limit is reached.
    pub(super) fn take(&self, peer: PeerId) -> Option<Slot> {
        let mut g = self.0.lock().ok()?;
        let (total, per_peer) = &mut *g;
        let mine = per_peer.get(&peer).copied().unwrap_or(0);
        if *total >= MAX_SERVING || mine >= MAX_SERVING_PER_PEER {
            return None;
        }
        *total += 1;
        per_peer.insert(peer, mine + 1);
        Some(Slot {
            serving: self.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.serving.0.lock() {
            let (total, per_peer) = &mut *g;
            *total = total.saturating_sub(1);
            if let Some(n) = per_peer.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    per_peer.remove(&self.peer);
                }
            }
        }
    }
}

impl Node {
    /// Answers one request (see the module docs).
    pub(super) async fn serve(
        &mut self,
        peer: PeerId,
        request: FetchRequest,
        channel: ResponseChannel<FetchResponse>,
    ) {
        tracing::trace!(%peer, ?request, "request");
        if !self.member(&peer) {
            // Chunks, manifests and heads of a permissioned region are its
            // members' alone.
            let _ = self.refuse(&Rejection::Outsider(peer.to_string()), &peer);
            let _ = self.net.respond(channel, FetchResponse::NotFound).await;
            return;
        }
        let response = match &request {
            FetchRequest::Attest(id) => match self.attestation(id) {
                Some(a) => FetchResponse::SignedManifest(a.envelope_bytes().to_vec()),
                None => FetchResponse::NotFound,
            },
            FetchRequest::Head { model_id, region } => {
                let cfg = &self.settings.engine;
                if *model_id == cfg.model_id && *region == cfg.region {
                    FetchResponse::Head(self.engine.version())
                } else {
                    FetchResponse::NotFound
                }
            }
            FetchRequest::Chunk(_) | FetchRequest::SignedManifest(_) => {
                let Some(slot) = self.serving.take(peer) else {
                    self.shared.metrics.requests_busy.inc();
                    let _ = self.net.respond(channel, FetchResponse::Busy).await;
                    return;
                };
                let (store, net, shared) =
                    (self.store.clone(), self.net.clone(), self.shared.clone());
                tokio::spawn(async move {
                    let response = tokio::task::spawn_blocking(move || read(&store, &request))
                        .await
                        .unwrap_or(FetchResponse::NotFound);
                    drop(slot);
                    if let FetchResponse::Chunk(bytes) = &response {
                        shared.metrics.chunks_served.inc();
                        shared.metrics.bytes_out.inc_by(bytes.len() as u64);
                    }
                    let _ = net.respond(channel, response).await;
                });
                return;
            }
        };
        let _ = self.net.respond(channel, response).await;
    }
}

/// The answer to a peer's chunk or manifest request, read from `store`: a
/// chunk (re-hashed: a rotten one is not served) or a signed manifest;
/// `NotFound` for anything else. Blocking. (Public for the transfer bench.)
pub fn read(store: &Store, request: &FetchRequest) -> FetchResponse {
    match request {
        FetchRequest::Chunk(id) => match store.get_verified(id) {
            Ok(Some(bytes)) => FetchResponse::Chunk(bytes.to_vec()),
            _ => FetchResponse::NotFound,
        },
        FetchRequest::SignedManifest(id) => match store.manifest_bytes(id) {
            Ok(Some((_, bytes))) => FetchResponse::SignedManifest(bytes.to_vec()),
            _ => FetchResponse::NotFound,
        },
        _ => FetchResponse::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_limited_per_peer_and_in_total_and_freed_when_done() {
        let s = Serving::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mine: Vec<Slot> = (0..MAX_SERVING_PER_PEER)
            .map(|_| s.take(a).unwrap())
            .collect();
        assert!(s.take(a).is_none(), "a ninth read for one peer");
        let other = s.take(b).unwrap();
        drop(mine);
        assert!(s.take(a).is_some());
        drop(other);
        // Many peers: the total bound holds.
        let many: Vec<Slot> = (0..MAX_SERVING)
            .filter_map(|_| s.take(PeerId::random()))
            .collect();
        assert_eq!(many.len(), MAX_SERVING);
        assert!(s.take(PeerId::random()).is_none());
        drop(many);
        assert_eq!(s.0.lock().unwrap().0, 0);
        assert!(s.0.lock().unwrap().1.is_empty());
    }
}
