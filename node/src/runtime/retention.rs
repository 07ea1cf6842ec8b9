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
