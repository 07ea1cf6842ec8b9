//! Disk space. The store may have a quota (`[store] quota_mb`); the disk
//! may run out. Either way the node marks the store full: it keeps serving
//! what it holds, keeps its peers and its API, and takes no new deltas or
//! versions (announcements are ignored, not fetched) until there is room.
//! Nothing it acknowledged is lost: a head moves only after its version is
//! stored and flushed, and a version that could not be stored is not
//! announced. The store's size is measured every tick (off the loop) and
//! every write is counted against the quota in between; the node takes no
//! new data above 90 % of the quota (the rest is headroom for its own vote
//! each round, written only while it fits the whole quota, and its
//! database's log); when full, a collection runs every
//! tick to free what it can, and the node takes data again under 80 % of
//! the quota, or once a probe write succeeds after the disk ran out.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::status::DiskFull;

use super::*;

/// A file system block: what a write is counted as at least (a chunk
/// takes its bytes, a 48-byte record header and its database entries).
const BLOCK: u64 = 4096;

/// Whether a measurement is running (shared with its thread).
pub(super) type Measuring = Arc<AtomicBool>;

impl Node {
    /// Whether the node takes new data (the store is not full).
    pub(super) fn accepting(&self) -> bool {
        self.shared.disk.full().is_none()
    }

    /// Whether `bytes` more fit the store's quota (if not, the store is
    /// full from now on).
    pub(super) fn room_for(&self, bytes: usize) -> bool {
        room_for(&self.shared, bytes)
    }

    /// Measures the store and decides whether it is (still) full, on a
    /// blocking thread, one measurement at a time; while it is full, also
    /// collects what can go now (rather than after the next head, which
    /// may not come while full). Called every tick.
    pub(super) fn check_space(&self) {
        if self.shared.disk.full().is_some() {
            self.collect_garbage(self.engine.round());
        }
        if self.measuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, shared, measuring) = (
            self.store.clone(),
            self.shared.clone(),
            self.measuring.clone(),
        );
        let quota = self.settings.quota_bytes;
        tokio::task::spawn_blocking(move || {
            let state = measure(&store, &shared, quota);
            shared.set_disk_full(state);
            measuring.store(false, Ordering::Release);
        });
    }

    /// A store write failed: if for want of space, the store is full.
    pub(super) fn store_failed(&self, e: &tapestry_storage::StoreError) {
        note_failure(&self.shared, e);
    }
}

/// The store takes no new data above 90 % of its quota: the rest is
/// headroom for what it still writes when full (its own vote each round,
/// its database's log).
fn high_water(quota: u64) -> u64 {
    quota / 10 * 9
}

/// Once full, the store takes data again under 80 % of its quota.
fn low_water(quota: u64) -> u64 {
    quota / 10 * 8
}

/// Whether `bytes` more fit the store's quota (from any thread); if not,
/// the store is full.
pub(super) fn room_for(shared: &Shared, bytes: usize) -> bool {
    let disk = &shared.disk;
    if disk.full().is_some() {
        return false;
    }
    let cost = cost(bytes);
    if disk.fits(cost, high_water) {
        return true;
    }
    shared.set_disk_full(Some(DiskFull::Quota {
        used: disk.used().saturating_add(cost),
        quota: disk.quota().unwrap_or(0),
    }));
    false
}

/// Whether `bytes` more fit under the whole quota (not only under the 90 %
/// above which the store takes no new data), counted as written if they
/// do; true without a quota. What a full store still writes (its own
/// vote) must pass this.
pub(super) fn within_quota(shared: &Shared, bytes: usize) -> bool {
    shared.disk.fits(cost(bytes), |quota| quota)
}

/// What writing `bytes` costs on disk: whole blocks, and the manifest and
/// index entries beside the chunks.
fn cost(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BLOCK) * BLOCK + BLOCK
}

/// What a store write error means for the disk state (from any thread).
pub(super) fn note_failure(shared: &Shared, e: &tapestry_storage::StoreError) {
    if e.is_out_of_space() {
        shared.set_disk_full(Some(DiskFull::NoSpace));
    }
}

/// The disk state now: over the quota (or, once full, not yet back under
/// 90 % of it), or out of space (until a probe write succeeds).
fn measure(store: &Store, shared: &Shared, quota: Option<u64>) -> Option<DiskFull> {
    let used = match store.disk_bytes() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot measure the store");
            return shared.disk.full();
        }
    };
    shared.metrics.store_bytes.set(used as i64);
    shared.disk.measured(used);
    let now = shared.disk.full();
    if let Some(quota) = quota {
        let limit = if matches!(now, Some(DiskFull::Quota { .. })) {
            low_water(quota)
        } else {
            high_water(quota)
        };
        if used > limit {
            return Some(DiskFull::Quota { used, quota });
        }
    }
    if now.is_some() {
        // Room again? Only a write can tell (the file system may be shared,
        // reserved blocks differ); it also mends a database that refused
        // every write after one failed.
        if let Err(e) = store.probe_room() {
            tracing::debug!(error = %e, "no room yet");
            return if e.is_out_of_space() {
                Some(DiskFull::NoSpace)
            } else {
                now
            };
        }
    }
    None
}
