//! What the node keeps on disk: after each new head, the marks of versions
//! more than `keep_versions` rounds behind it are dropped and the store
//! collects garbage with that horizon (the head, its latest ancestors and
//! their deltas stay; so do the deltas of the round window the engine holds
//! or admitted — it may still aggregate them, and peers verifying versions
//! that did may ask for them — and anything written since the previous
//! collection began), on a blocking thread, one collection at a time.

use std::sync::atomic::{AtomicBool, Ordering};

use tapestry_storage::StoreError;

use super::*;

impl Node {
    /// Starts a collection for a head of round `head_round`, unless one is
    /// still running or retention is off.
    pub(super) fn collect_garbage(&self, head_round: u64) {
        let keep = self.settings.keep_versions;
        if keep == 0 || self.collecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, shared, collecting, window) = (
            self.store.clone(),
            self.shared.clone(),
            self.collecting.clone(),
            self.engine.window_deltas(),
        );
        tokio::task::spawn_blocking(move || {
            match collect(&store, head_round, keep, &window) {
                Ok(report) => {
                    let m = &shared.metrics;
                    m.store_chunk_bytes.set(report.bytes_kept as i64);
                    m.store_manifests.set(report.manifests_kept as i64);
                    m.gc_deleted_bytes.inc_by(report.bytes_deleted);
                    tracing::debug!(?report, "garbage collected");
                }
                Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
            }
            collecting.store(false, Ordering::Release);
        });
    }
}

/// Whether a collection is running (shared with its thread).
pub(super) type Collecting = Arc<AtomicBool>;

/// Drops the verified and attested marks of versions older than
/// `head_round − keep`, then collects everything older, and everything
/// else no version kept names, except the deltas of the round window.
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
