//! The in-memory backend: for the simulator and for tests. Same semantics as
//! the sled backend, nothing on disk.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::{Backend, GcGate, KvOp, KvVisitor};
use crate::bytes::Bytes;
use crate::error::StoreError;

/// A chunk store held in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: RwLock<BTreeMap<Vec<u8>, Arc<[u8]>>>,
    gate: GcGate,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<Vec<u8>, Arc<[u8]>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<Vec<u8>, Arc<[u8]>>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for MemoryStore {
    fn kv_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self.read().get(key).cloned().map(Bytes::from_shared))
    }

    fn kv_contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.read().contains_key(key))
    }

    fn kv_apply(&self, batch: Vec<KvOp<'_>>) -> Result<(), StoreError> {
        // Build the values before taking the lock, then apply all at once.
        type Op = (Vec<u8>, Option<Arc<[u8]>>);
        let ops: Vec<Op> = batch
            .into_iter()
            .map(|op| match op {
                KvOp::Put(k, v) => (k, Some(Arc::from(v))),
                KvOp::Delete(k) => (k, None),
            })
            .collect();
        let mut map = self.write();
        for (k, v) in ops {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn kv_for_each(&self, prefix: u8, f: &mut KvVisitor<'_>) -> Result<(), StoreError> {
        // Snapshot the matching entries (cheap Arc clones) so `f` may write.
        let entries: Vec<(Vec<u8>, Arc<[u8]>)> = self
            .read()
            .range(vec![prefix]..)
            .take_while(|(k, _)| k.first() == Some(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in entries {
            f(&k, &v)?;
        }
        Ok(())
    }

    fn kv_compare_and_swap(
        &self,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let mut map = self.write();
        if map.get(key).map(|v| &v[..]) != old {
            return Ok(false);
        }
        match new {
            Some(v) => map.insert(key.to_vec(), Arc::from(v)),
            None => map.remove(key),
        };
        Ok(true)
    }

    fn kv_flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kv_size(&self) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum())
    }

    fn gc_gate(&self) -> &GcGate {
        &self.gate
    }
}
