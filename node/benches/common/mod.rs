//! What more than one bench needs.

use tapestry_protocol::ContentId;
use tapestry_storage::ChunkStore;

/// `n` distinct pseudo-random chunks of `size` bytes in `store`, flushed;
/// their ids.
pub fn fill(store: &dyn ChunkStore, n: usize, size: usize) -> Vec<ContentId> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; size];
    let ids = (0..n)
        .map(|_| {
            for word in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            store.put(&chunk).unwrap()
        })
        .collect();
    store.flush().unwrap();
    ids
}
