//! Chunks this node's fetches hold in memory before they are stored (each
//! checked against its id as it arrived): served to peers that fetch the
//! same payload at the same time, so a delta's author does not upload it
//! to every member itself (see `runtime::Swarm`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tapestry_protocol::ContentId;

/// Each chunk held, and how many fetches hold it.
type Held = HashMap<ContentId, (Arc<Vec<u8>>, usize)>;

/// How long a member that did not serve its share of a swarmed fetch is
/// given none.
pub const UNSHARED_FOR: Duration = Duration::from_secs(600);

/// The chunks in flight, each with the number of fetches holding it; and
/// the members that lately did not serve their share of a fetch.
#[derive(Debug, Default)]
pub struct InFlight {
    chunks: Mutex<Held>,
    unshared: Mutex<HashMap<PeerId, Instant>>,
}

impl InFlight {
    fn chunks(&self) -> MutexGuard<'_, Held> {
        // Nothing is left half-changed under this lock.
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fetch holds `bytes`, checked against `id`.
    pub fn hold(&self, id: ContentId, bytes: Arc<Vec<u8>>) {
        self.chunks()
            .entry(id)
            .and_modify(|e| e.1 += 1)
            .or_insert((bytes, 1));
    }

    /// A fetch no longer holds chunk `id`.
    pub fn release(&self, id: &ContentId) {
        let mut chunks = self.chunks();
        if let Some(e) = chunks.get_mut(id) {
            e.1 -= 1;
            if e.1 == 0 {
                chunks.remove(id);
            }
        }
    }

    /// Chunk `id`, if a fetch holds it.
    pub fn get(&self, id: &ContentId) -> Option<Arc<Vec<u8>>> {
        self.chunks().get(id).map(|e| e.0.clone())
    }

    /// `peer` served less than its share of a fetch: for
    /// [`UNSHARED_FOR`], it is given none (see [`InFlight::shares`]).
    pub fn note_unshared(&self, peer: PeerId) {
        let mut u = self.unshared.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        u.retain(|_, until| *until > now);
        u.insert(peer, now + UNSHARED_FOR);
    }

    /// Whether `peer` is to be given a share of a fetch (it did not lately
    /// fail to serve one).
    pub fn shares(&self, peer: &PeerId) -> bool {
        let u = self.unshared.lock().unwrap_or_else(|e| e.into_inner());
        u.get(peer).is_none_or(|until| *until <= Instant::now())
    }

    /// How many chunks are held.
    pub fn len(&self) -> usize {
        self.chunks().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_held_by_two_fetches_stays_until_both_release_it() {
        let f = InFlight::default();
        let id = ContentId::of(b"x");
        f.hold(id, Arc::new(b"x".to_vec()));
        f.hold(id, Arc::new(b"x".to_vec()));
        f.release(&id);
        assert_eq!(f.get(&id).as_deref().map(Vec::as_slice), Some(&b"x"[..]));
        f.release(&id);
        assert!(f.get(&id).is_none());
        assert!(f.is_empty());
        f.release(&id);
    }

    #[test]
    fn a_member_that_did_not_serve_its_share_is_given_none_for_a_while() {
        let f = InFlight::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        f.note_unshared(a);
        assert!(!f.shares(&a));
        assert!(f.shares(&b));
    }
}

/// Rounds of this node's own deltas whose chunks are remembered.
const OWN_ROUNDS: u64 = 4;

/// The chunk ids of this node's own deltas of its latest rounds, so that
/// serving one counts as the author's upload (`own_bytes_out`).
#[derive(Debug, Default)]
pub struct OwnChunks {
    chunks: Mutex<HashMap<ContentId, u64>>,
}

impl OwnChunks {
    /// This node published a delta of `round` cut into `ids`; chunks of
    /// deltas [`OWN_ROUNDS`] or more rounds older are forgotten.
    pub fn note(&self, round: u64, ids: &[ContentId]) {
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        chunks.retain(|_, r| *r + OWN_ROUNDS > round);
        chunks.extend(ids.iter().map(|id| (*id, round)));
    }

    /// Whether `id` is a chunk of one of this node's recent deltas.
    pub fn contains(&self, id: &ContentId) -> bool {
        self.chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }
}

/// Payloads whose chunks are going into the store, or are there, before
/// their manifest is: no manifest names those chunks yet, so a garbage
/// collection takes them as roots until the manifest is stored, or the
/// payload is refused or given up.
#[derive(Debug, Default)]
pub struct Landing {
    payloads: Mutex<HashMap<ContentId, Vec<ContentId>>>,
}

impl Landing {
    fn payloads(&self) -> MutexGuard<'_, HashMap<ContentId, Vec<ContentId>>> {
        self.payloads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delta `delta`'s chunks `ids` are coming into the store.
    pub fn begin(&self, delta: ContentId, ids: &[ContentId]) {
        self.payloads().insert(delta, ids.to_vec());
    }

    /// Delta `delta`'s manifest is stored, or its chunks are no longer
    /// wanted.
    pub fn end(&self, delta: &ContentId) {
        self.payloads().remove(delta);
    }

    /// Every chunk id of the payloads landing.
    pub fn chunk_ids(&self) -> Vec<ContentId> {
        self.payloads().values().flatten().copied().collect()
    }
}

#[cfg(test)]
mod landing_tests {
    use super::*;

    #[test]
    fn a_payload_is_a_root_from_its_beginning_to_its_end() {
        let l = Landing::default();
        let (d, e) = (ContentId::of(b"d"), ContentId::of(b"e"));
        let ids = [ContentId::of(b"1"), ContentId::of(b"2")];
        l.begin(d, &ids);
        l.begin(e, &ids[..1]);
        assert_eq!(l.chunk_ids().len(), 3);
        l.end(&d);
        assert_eq!(l.chunk_ids(), vec![ids[0]]);
        l.end(&e);
        l.end(&e);
        assert!(l.chunk_ids().is_empty());
    }
}
