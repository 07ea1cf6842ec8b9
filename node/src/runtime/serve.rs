//! Answering peers' requests. Heads and attestations come from the node's
//! state on its loop (cheap); chunks and manifests are read (and chunks
//! hashed) on blocking threads, at most [`MAX_SERVING`] at once and
//! [`MAX_SERVING_PER_PEER`] for one peer: past that the answer is `Busy`,
//! counted, and the peer asks again later or elsewhere. In a permissioned
//! region, outsiders get nothing.
//!
//! Chunk streams (`/tapestry/chunks/1`, many chunks on one stream) are
//! served off the node's loop altogether, by [`serve_chunk_streams`]: at
//! most [`MAX_STREAMS`] at once and [`MAX_STREAMS_PER_PEER`] for one peer,
//! each reading ahead at most [`STREAM_READ_AHEAD`] chunks, every write
//! bounded by a timeout (a peer that stops reading loses its stream);
//! beyond that a stream is told `Busy` once its request is in (at most
//! [`MAX_TURNING_AWAY`] waiting for theirs, [`REQUEST_TIMEOUT`] each), and
//! past that dropped unanswered.

use std::collections::HashMap;

use libp2p::request_response::ResponseChannel;

use super::*;

/// Chunk and manifest reads in flight at once, for all peers.
pub(super) const MAX_SERVING: usize = 256;
/// Chunk and manifest reads in flight at once for one peer.
pub(super) const MAX_SERVING_PER_PEER: usize = 64;

/// Chunk streams served at once, for all peers.
pub const MAX_STREAMS: usize = 32;
/// Chunk streams served at once for one peer (a fetching node opens two
/// per provider).
pub const MAX_STREAMS_PER_PEER: usize = 4;
/// Streams without a place being told `Busy` at once, for all peers (each
/// waits at most [`REQUEST_TIMEOUT`] for its request); beyond, a stream is
/// dropped unanswered (and counted busy).
pub const MAX_TURNING_AWAY: usize = 64;
/// Chunks a stream reads from the store ahead of what it has written (so
/// reading and sending overlap; with 4-MiB chunks, at most 32 × 2 × 4 MiB
/// are held for all streams).
pub const STREAM_READ_AHEAD: usize = 2;
/// How long a request may take to arrive on a stream (a stream without a
/// place waits this long at most, its request 2 KiB at most).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each write to the peer may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(20);

/// Reads (or streams) in flight, in total and per peer (a peer's entry goes
/// when its last one ends, so the map holds at most `total` peers).
#[derive(Debug, Clone)]
pub(super) struct Serving {
    held: Arc<Mutex<(usize, HashMap<PeerId, usize>)>>,
    total: usize,
    per_peer: usize,
}

impl Default for Serving {
    /// The limits of chunk and manifest requests.
    fn default() -> Self {
        Self::new(MAX_SERVING, MAX_SERVING_PER_PEER)
    }
}

/// One read in flight; ends when dropped.
pub(super) struct Slot {
    serving: Serving,
    peer: PeerId,
}

impl Serving {
    /// At most `total` at once, `per_peer` for one peer.
    pub(super) fn new(total: usize, per_peer: usize) -> Self {
        Self {
            held: Arc::default(),
            total,
            per_peer,
        }
    }

    /// A slot for `peer`, if neither limit is reached.
    pub(super) fn take(&self, peer: PeerId) -> Option<Slot> {
        let mut g = self.held.lock().ok()?;
        let (total, per_peer) = &mut *g;
        let mine = per_peer.get(&peer).copied().unwrap_or(0);
        if *total >= self.total || mine >= self.per_peer {
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
        if let Ok(mut g) = self.serving.held.lock() {
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
            // members' alone; a neighbouring region's members get the
            // versions exported to them and nothing else.
            let federated = self.federation.as_ref().is_some_and(|f| f.federated(&peer));
            if !federated {
                let _ = self.refuse(&Rejection::Outsider(peer.to_string()), &peer);
            }
            if !federated || !self.exported(&request) {
                let _ = self.net.respond(channel, FetchResponse::NotFound).await;
                return;
            }
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
            FetchRequest::MixHead {
                model_id,
                region,
                round,
            } => {
                let cfg = &self.settings.engine;
                match &self.federation {
                    Some(f) if *model_id == cfg.model_id && *region == cfg.region => {
                        FetchResponse::Head(f.exports.adopted(*round))
                    }
                    _ => FetchResponse::NotFound,
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
                let own = matches!(&request, FetchRequest::Chunk(id) if shared.own.contains(id));
                tokio::spawn(async move {
                    let response = tokio::task::spawn_blocking(move || read(&store, &request))
                        .await
                        .unwrap_or(FetchResponse::NotFound);
                    drop(slot);
                    if let FetchResponse::Chunk(bytes) = &response {
                        shared.metrics.chunks_served.inc();
                        shared.metrics.bytes_out.inc_by(bytes.len() as u64);
                        if own {
                            shared.metrics.own_bytes_out.inc_by(bytes.len() as u64);
                        }
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

/// Whether a peer may be served: any peer in an open region, a member of
/// the roster in a permissioned one.
pub type MemberCheck = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// Which chunks a peer may have on a stream.
pub enum Access {
    /// Any chunk this node holds (a member).
    All,
    /// Only those this test passes (a neighbouring region's member: the
    /// chunks of exported versions); others are answered as not held.
    Only(ChunkFilter),
    /// None: the stream is dropped unanswered (an outsider).
    Nothing,
}

/// Which chunks a peer of [`Access::Only`] may have.
pub type ChunkFilter = Arc<dyn Fn(&ContentId) -> bool + Send + Sync>;

/// What a peer may have on a stream.
pub type AccessCheck = Arc<dyn Fn(&PeerId) -> Access + Send + Sync>;

/// Serves the chunk streams peers open (see the module docs) until
/// `incoming` ends, to members (`member`) only. Public for the transfer
/// bench.
pub async fn serve_chunk_streams(
    incoming: libp2p_stream::IncomingStreams,
    store: Store,
    shared: Shared,
    member: MemberCheck,
) {
    let access: AccessCheck = Arc::new(move |peer: &PeerId| {
        if member(peer) {
            Access::All
        } else {
            Access::Nothing
        }
    });
    serve_chunk_streams_to(incoming, store, shared, access).await;
}

/// [`serve_chunk_streams`], each peer served what `access` allows.
pub async fn serve_chunk_streams_to(
    mut incoming: libp2p_stream::IncomingStreams,
    store: Store,
    shared: Shared,
    access: AccessCheck,
) {
    use futures::StreamExt;
    let streams = Serving::new(MAX_STREAMS, MAX_STREAMS_PER_PEER);
    let turning_away = Serving::new(MAX_TURNING_AWAY, MAX_STREAMS_PER_PEER);
    while let Some((peer, stream)) = incoming.next().await {
        let only = match access(&peer) {
            Access::All => None,
            Access::Only(f) => Some(f),
            Access::Nothing => {
                // The chunks of a permissioned region are its members'
                // alone: an outsider's stream is dropped unanswered,
                // before it can take a member's place.
                let r = Rejection::Outsider(peer.to_string());
                tracing::info!(%peer, reason = r.label(), "refused a chunk stream");
                shared.metrics.reject(r.label());
                continue;
            }
        };
        let slot = streams.take(peer);
        // A stream without a place is told `Busy` once its request is in;
        // past [`MAX_TURNING_AWAY`] such streams it is dropped at once.
        let waiting = match slot {
            Some(_) => None,
            None => match turning_away.take(peer) {
                Some(w) => Some(w),
                None => {
                    shared.metrics.requests_busy.inc();
                    continue;
                }
            },
        };
        let (store, shared) = (store.clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_stream(stream, slot, only, &store, &shared).await {
                tracing::debug!(%peer, error = %e, "chunk stream ended");
            }
            drop(waiting);
        });
    }
}

/// A chunk to serve: read from the store, or held by a fetch.
enum Held {
    Stored(tapestry_storage::Bytes),
    InFlight(Arc<Vec<u8>>),
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        match self {
            Held::Stored(b) => b,
            Held::InFlight(b) => b,
        }
    }
}

/// Answers one chunk stream of a member: `Busy` without a slot, else
/// every chunk asked for (read and re-hashed on blocking threads,
/// [`STREAM_READ_AHEAD`] ahead of the writes, or held by one of this
/// node's fetches) or "not held".
async fn serve_stream(
    mut stream: libp2p::Stream,
    slot: Option<Slot>,
    only: Option<ChunkFilter>,
    store: &Store,
    shared: &Shared,
) -> std::io::Result<()> {
    use futures::{AsyncWriteExt, StreamExt};
    let timed = |what: &'static str| {
        move |_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"))
    };
    // The request is read even to answer `Busy`: closing before the asker
    // has written it would fail its write, not tell it to wait.
    let ids = tokio::time::timeout(REQUEST_TIMEOUT, net::read_request(&mut stream))
        .await
        .map_err(timed("reading the request"))??;
    let Some(slot) = slot else {
        shared.metrics.requests_busy.inc();
        tokio::time::timeout(STREAM_TIMEOUT, net::write_busy(&mut stream))
            .await
            .map_err(timed("answering busy"))??;
        return tokio::time::timeout(STREAM_TIMEOUT, stream.close())
            .await
            .map_err(timed("closing"))?;
    };
    let mut reads = futures::stream::iter(ids)
        .map(|id| {
            let (store, inflight) = (store.clone(), shared.inflight.clone());
            let own = shared.own.contains(&id);
            let allowed = only.as_ref().is_none_or(|f| f(&id));
            async move {
                if !allowed {
                    return (own, None);
                }
                // From the store, or else from a fetch of this node's that
                // holds it (checked on arrival) and has not stored it yet.
                let held = tokio::task::spawn_blocking(move || match store.get_verified(&id) {
                    Ok(Some(bytes)) => Some(Held::Stored(bytes)),
                    _ => inflight.get(&id).map(Held::InFlight),
                })
                .await
                .ok()
                .flatten();
                (own, held)
            }
        })
        .buffered(STREAM_READ_AHEAD);
    while let Some((own, chunk)) = reads.next().await {
        let write = async {
            match &chunk {
                Some(bytes) => net::write_chunk(&mut stream, bytes.as_ref()).await,
                None => net::write_missing(&mut stream).await,
            }
        };
        tokio::time::timeout(STREAM_TIMEOUT, write)
            .await
            .map_err(timed("sending a chunk"))??;
        if let Some(bytes) = &chunk {
            shared.metrics.chunks_served.inc();
            shared.metrics.bytes_out.inc_by(bytes.as_ref().len() as u64);
            if own {
                shared
                    .metrics
                    .own_bytes_out
                    .inc_by(bytes.as_ref().len() as u64);
            }
        }
    }
    drop(slot);
    tokio::time::timeout(STREAM_TIMEOUT, stream.close())
        .await
        .map_err(timed("closing"))?
}

impl Node {
    /// Starts serving chunk streams (on the node's task set), if the
    /// network offers them.
    pub(super) fn start_serving_streams(&mut self) {
        let Some(incoming) = self.net.accept_chunks() else {
            return;
        };
        let roster = self.settings.roster.clone();
        let federation = self.federation.clone();
        let access: AccessCheck = Arc::new(move |peer: &PeerId| {
            if is_member(roster.as_ref().map(|r| r.message()), peer) {
                return Access::All;
            }
            match &federation {
                Some(f) if f.federated(peer) => {
                    let exports = f.exports.clone();
                    Access::Only(Arc::new(move |id: &ContentId| exports.has_chunk(id)))
                }
                _ => Access::Nothing,
            }
        });
        let (store, shared) = (self.store.clone(), self.shared.clone());
        self.tasks
            .spawn(serve_chunk_streams_to(incoming, store, shared, access));
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
        assert_eq!(s.held.lock().unwrap().0, 0);
        assert!(s.held.lock().unwrap().1.is_empty());
    }
}
