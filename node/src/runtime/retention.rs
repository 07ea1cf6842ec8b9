//! What the node keeps on disk: after each new head, the marks of versions
//! more than `keep_versions` rounds behind it are dropped and the store
//! collects garbage with that horizon (the head, its latest ancestors and
//! their deltas stay; so do the deltas of the round window the engine holds
//! or admitted — it may still aggregate them, and peers verifying versions
//! that did may ask for them — and anything written since the previous
//! collection began), on a blocking thread, one collection at a time.
//!
//! With a quota, the horizon is also what fits: a round keeps its version
//! and the deltas aggregated into it (the head's are the measure), the
//! rest of the store (its database, the packs' dead bytes) is measured
//! after each collection, and the next keeps no more rounds than fit
//! beside the rest in [`QUOTA_SHARE`] of the quota (never fewer than
//! [`MIN_HORIZON`]), so a large model's store gives up its oldest versions
//! instead of filling up and stopping new data (which it still does when
//! even the fewest rounds do not fit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tapestry_storage::StoreError;

use super::*;

impl Node {
    /// Starts a collection for a head of round `head_round`, unless one is
    /// still running or retention is off.
    pub(super) fn collect_garbage(&self, head_round: u64) {
        self.collect_garbage_passes(head_round, 1);
    }

    /// The door refused a payload whose chunks went into the store as they
    /// arrived: two collections in a row (what was written since the
    /// previous collection began survives one), so the refused chunks do
    /// not stay on disk (nor are served) longer than it takes; unless one
    /// is running or retention is off.
    /// One that finds a collection running is owed, and started by the
    /// node's next tick after it ends ([`Node::collect_owed`]).
    pub(super) fn collect_refused(&self) {
        self.collecting.owed.store(true, Ordering::Release);
        self.collect_garbage_passes(self.engine.round(), 2);
    }

    /// Starts the two collections a refusal is owed once none is running.
    pub(super) fn collect_owed(&self) {
        if self.collecting.owed.load(Ordering::Acquire) {
            self.collect_refused();
        }
    }

    fn collect_garbage_passes(&self, head_round: u64, passes: usize) {
        let keep = self.settings.keep_versions;
        if keep == 0 || self.collecting.running.swap(true, Ordering::AcqRel) {
            return;
        }
        if passes >= 2 {
            self.collecting.owed.store(false, Ordering::Release);
        }
        // A round keeps its version and the deltas aggregated into it: the
        // head's are the measure (a delta counted at the model's size, as
        // an f32 one takes).
        let per_round = self.shared.head.lock().ok().and_then(|h| {
            h.as_ref().map(|v| {
                let m = v.message();
                m.payload_bytes.saturating_mul(1 + m.deltas.len() as u64)
            })
        });
        let keep = horizon(
            keep,
            self.shared.disk.quota(),
            per_round.unwrap_or(0),
            self.collecting.rest.load(Ordering::Relaxed),
        );
        let (store, shared, collecting, window) = (
            self.store.clone(),
            self.shared.clone(),
            self.collecting.clone(),
            self.engine.window_deltas(),
        );
        tokio::task::spawn_blocking(move || {
            for _ in 0..passes {
                // Payloads landing in the store are kept as they are when
                // each pass begins (one beginning later is written after
                // it began, which keeps it too).
                let mut roots = window.clone();
                roots.extend(shared.landing.chunk_ids());
                match collect(&store, head_round, keep, &roots) {
                    Ok(report) => {
                        if let Ok(bytes) = store.disk_bytes() {
                            let rest = bytes.saturating_sub(report.bytes_kept);
                            collecting.rest.store(rest, Ordering::Relaxed);
                        }
                        shared.update(|s| s.keep_rounds = keep);
                        let m = &shared.metrics;
                        m.store_chunk_bytes.set(report.bytes_kept as i64);
                        m.store_manifests.set(report.manifests_kept as i64);
                        m.gc_deleted_bytes.inc_by(report.bytes_deleted);
                        tracing::debug!(?report, "garbage collected");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "garbage collection failed");
                        break;
                    }
                }
            }
            collecting.running.store(false, Ordering::Release);
        });
    }
}

/// Whether a collection is running (shared with its thread), and whether
/// a refused payload's two collections are owed.
#[derive(Debug, Default)]
pub(super) struct GcState {
    running: AtomicBool,
    owed: AtomicBool,
    /// Bytes of the store besides the chunks kept (its database, the
    /// packs' dead bytes), as measured after the last collection.
    rest: AtomicU64,
}

/// Of a quota, the share the rounds kept may take on disk: a round or two
/// is written between two collections, and the node takes no new data
/// above 90 % of the quota.
pub(super) const QUOTA_SHARE: (u64, u64) = (7, 10);

/// Rounds behind the head a collection keeps at least, whatever the
/// quota: a peer a round or two behind can still catch up by recomputing
/// from this node's store.
pub(super) const MIN_HORIZON: u64 = 2;

/// The rounds behind the head a collection keeps: `keep`, or with a
/// `quota`, no more than fit at `per_round` bytes a round (the head's
/// round included) beside `rest` bytes in [`QUOTA_SHARE`] of it, and at
/// least [`MIN_HORIZON`]. `keep` 0 (keep everything) is left alone.
pub(super) fn horizon(keep: u64, quota: Option<u64>, per_round: u64, rest: u64) -> u64 {
    let (Some(quota), true) = (quota, keep > 0 && per_round > 0) else {
        return keep;
    };
    let room = (quota / QUOTA_SHARE.1 * QUOTA_SHARE.0).saturating_sub(rest);
    let fit = (room / per_round).saturating_sub(1);
    keep.min(fit.max(MIN_HORIZON))
}

/// [`GcState`], shared.
pub(super) type Collecting = Arc<GcState>;

/// Drops the verified and attested marks of versions older than
/// `head_round − keep`, then collects everything older, and everything
/// else no version kept names, except `window` (the deltas of the round
/// window, and the chunks of payloads landing).
fn collect(
    store: &Store,
    head_round: u64,
    keep: u64,
    window: &[ContentId],
) -> Result<tapestry_storage::GcReport, StoreError> {
    let oldest = head_round.saturating_sub(keep);
    for (name, id) in store.refs()? {
        if !(name.starts_with("verified/") || name.starts_with("attested/")) {
            continue;
        }
        let old = store
            .model_manifest_message(&id)?
            .is_none_or(|m| m.round < oldest);
        if old {
            store.delete_ref(&name)?;
        }
    }
    store.gc_retaining(oldest, window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_is_what_fits_the_quota_within_its_bounds() {
        const MB: u64 = 1 << 20;
        // No quota, nothing measured yet, or keep everything: as configured.
        assert_eq!(horizon(256, None, MB, 0), 256);
        assert_eq!(horizon(256, Some(100 * MB), 0, 0), 256);
        assert_eq!(horizon(0, Some(100 * MB), MB, 0), 0);
        // 70 % of 100 MB is 70 rounds of 1 MB: the head's and 69 behind it;
        // 60 beside 10 MB of database.
        assert_eq!(horizon(256, Some(100 * MB), MB, 0), 69);
        assert_eq!(horizon(256, Some(100 * MB), MB, 10 * MB), 59);
        assert_eq!(horizon(20, Some(100 * MB), MB, 0), 20);
        // Rounds too large for the quota, or a database as large as the
        // share: the fewest still kept.
        assert_eq!(horizon(256, Some(100 * MB), 50 * MB, 0), MIN_HORIZON);
        assert_eq!(horizon(256, Some(100 * MB), MB, 80 * MB), MIN_HORIZON);
        assert_eq!(horizon(1, Some(100 * MB), 50 * MB, 0), 1);
    }
}
