//! The backend primitives behind [`crate::ChunkStore`]: an ordered
//! key-value space with atomic batches, compare-and-swap and an fsync, plus
//! the gate that keeps writers and the garbage collector apart. A backend
//! implements [`Backend`] and is then a `ChunkStore`; nothing else in the
//! store depends on how it keeps its bytes (redb's `StorageBackend` is the
//! model).

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tapestry_protocol::ContentId;

use crate::bytes::Bytes;
use crate::error::StoreError;

/// A visitor over the entries of one key prefix: `(key, value)`.
pub type KvVisitor<'v> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'v;

/// One write in an atomic batch.
#[derive(Debug)]
pub enum KvOp<'a> {
    /// Insert or replace.
    Put(Vec<u8>, &'a [u8]),
    /// Remove if present.
    Delete(Vec<u8>),
}

/// What a store keeps its records in. Implement this, and the type is a
/// [`crate::ChunkStore`] (a blanket implementation provides every store
/// operation over these primitives).
pub trait Backend: Send + Sync {
    /// Reads one value.
    fn kv_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError>;
    /// Whether a key is present.
    fn kv_contains(&self, key: &[u8]) -> Result<bool, StoreError>;
    /// Applies a batch. After a crash, each of its writes is either done or
    /// not, with one promise: chunk bytes (`c` keys) are never missing while
    /// their index entry (`i` key) exists, unless the disk lost them. Backends
    /// that can, apply the whole batch atomically.
    fn kv_apply(&self, batch: Vec<KvOp<'_>>) -> Result<(), StoreError>;
    /// Calls `f` on every key with `prefix`, in key order, one value at a time.
    fn kv_for_each(&self, prefix: u8, f: &mut KvVisitor<'_>) -> Result<(), StoreError>;
    /// Atomically replaces `old` by `new` (`None` = absent); false if the
    /// current value was not `old`.
    fn kv_compare_and_swap(
        &self,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError>;
    /// Makes every chunk write completed so far durable before any later
    /// write to the other keys (refs) can be: called before a ref is moved.
    /// A backend that writes everything to one ordered log needs nothing here.
    fn kv_chunk_barrier(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Gives back the space of deleted records, after a garbage collection
    /// (called without the gate held; a backend that needs the writers to
    /// pause takes the gate itself). Returns the bytes of chunk data it
    /// rewrote. A backend that frees space as it deletes needs nothing here.
    fn kv_compact(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Makes every completed write durable (fsync).
    fn kv_flush(&self) -> Result<(), StoreError>;
    /// Whether the backend can write again (after running out of space),
    /// mending on the way what a failed write left refusing every write.
    /// Writes nothing that stays. Default: a flush.
    fn kv_probe_room(&self) -> Result<(), StoreError> {
        self.kv_flush()
    }
    /// Bytes the records occupy on disk (or in memory).
    fn kv_size(&self) -> Result<u64, StoreError>;
    /// The garbage collector's gate (each backend owns one).
    fn gc_gate(&self) -> &GcGate;
}

/// Coordinates writers with the garbage collector (see the module docs).
/// Each backend owns one and hands it out through [`Backend::gc_gate`].
#[derive(Debug, Default)]
pub struct GcGate {
    gate: RwLock<()>,
    written: Mutex<HashSet<ContentId>>,
    collecting: Mutex<()>,
}

fn unpoison<T>(r: Result<T, PoisonError<T>>) -> T {
    // A panic elsewhere while holding these locks leaves no half-written state
    // behind (they guard no data, or only a set of ids), so carry on.
    r.unwrap_or_else(PoisonError::into_inner)
}

impl GcGate {
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        unpoison(self.gate.read())
    }
    /// Held by the garbage collector's sweep (and a backend's compaction):
    /// no writer is between its first and last write meanwhile.
    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        unpoison(self.gate.write())
    }
    pub(crate) fn written(&self) -> MutexGuard<'_, HashSet<ContentId>> {
        unpoison(self.written.lock())
    }
    /// Held by a collection from start to end: one at a time.
    pub(crate) fn one_collection(&self) -> MutexGuard<'_, ()> {
        unpoison(self.collecting.lock())
    }
    pub(crate) fn record(&self, ids: impl IntoIterator<Item = ContentId>) {
        self.written().extend(ids);
    }
}
