//! Chunks this node's fetches hold in memory before they are stored (each
//! checked against its id as it arrived): served to peers that fetch the
//! same payload at the same time, so a delta's author does not upload it
//! to every member itself (see `runtime::Swarm`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tapestry_protocol::ContentId;

/// Each chunk held, and how many fetches hold it.
type Held = HashMap<ContentId, (Arc<Vec<u8>>, usize)>;

/// The chunks in flight, each with the number of fetches holding it.
#[derive(Debug, Default)]
pub struct InFlight {
    chunks: Mutex<Held>,
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
}
