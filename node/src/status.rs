//! What the node shows of itself: the `/status` document and the state
//! shared between the running node and the HTTP API (which depends on
//! this module, not on the runtime).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tapestry_protocol::{ModelManifest, Verified};

use crate::metrics::Metrics;

/// What `/status` and `tapestry status` show.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// This node.
    pub node_id: String,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// The model.
    pub model_id: String,
    /// The region.
    pub region: String,
    /// The current round.
    pub round: u64,
    /// The head model version (manifest id).
    pub head: Option<String>,
    /// Content id of the head's parameters (equal on nodes that agree).
    pub head_params: Option<String>,
    /// Test accuracy of the head on the local evaluation split (evaluated
    /// off the node's loop: for a moment after a new head, the previous
    /// head's).
    pub accuracy: Option<f32>,
    /// Test loss of the head on the local evaluation split (as `accuracy`;
    /// nats per row, or per byte for a language model).
    pub loss: Option<f32>,
    /// A language model's bits per byte on the node's held-out text (as
    /// `accuracy`; lower is better, 8 is a uniform guess).
    pub bits_per_byte: Option<f64>,
    /// Bits per byte on each part of the held-out text: one per corpus
    /// file, named by the file name up to its first `.` (the language).
    pub bits_per_byte_by_part: BTreeMap<String, f64>,
    /// Connected peers (as the network sees them: a peer being turned away
    /// counts until its connection closes).
    pub peers: usize,
    /// Connected non-members of a permissioned region that the node keeps
    /// (at most 16; more are turned away); 0 in an open region.
    pub outsiders: usize,
    /// Peers in this node's gossip mesh (their peer ids).
    pub mesh: Vec<String>,
    /// Peers' model versions being verified now (at most 16 at once).
    pub verifying: usize,
    /// The most verified at once since the node started.
    pub verifying_peak: usize,
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Application bytes received (gossip and fetched chunks).
    pub bytes_in: u64,
    /// Application bytes sent (gossip and served chunks).
    pub bytes_out: u64,
    /// Bytes of this node's own deltas served to peers: its upload as an
    /// author.
    pub own_bytes_out: u64,
    /// Deltas accepted.
    pub deltas_accepted: u64,
    /// Deltas and messages rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// The largest L2 norm a delta may have now (a multiple of the median
    /// of recent deltas' norms), once enough were seen.
    pub norm_limit: Option<f32>,
    /// Peers' versions verified by recomputation.
    pub versions_verified: u64,
    /// Peers' versions taken on roster members' attestations.
    pub versions_attested: u64,
    /// Time spent recomputing peers' versions, milliseconds (rebuilding
    /// and checking; fetching and storing excluded).
    pub recompute_ms: f64,
    /// Delta bytes fetched only to verify a version.
    pub verify_fetched_bytes: u64,
    /// Time spent storing the versions verified by recomputation (their
    /// parameters, manifest and verified mark), milliseconds.
    pub keep_verified_ms: f64,
    /// Time spent in each stage of the work on rounds, milliseconds since
    /// the node started (`train`, `evaluate`, `encode`, `hash`, `sign`,
    /// `store`, `announce`, `fetch`, `check_chunks`, `decode`,
    /// `aggregate`, `verify`, `adopt`, `engine`: see node/README.md,
    /// "Where a round's time goes"). Stages overlap in time.
    pub stage_ms: BTreeMap<String, f64>,
    /// Peers' versions found to be the same computation as one this node
    /// made or verified (checked by comparison, not recomputed).
    pub versions_matched: u64,
    /// Chunk bytes the store held after its last garbage collection.
    pub store_chunk_bytes: u64,
    /// Manifests (versions and deltas) the store held after its last
    /// garbage collection.
    pub store_manifests: u64,
    /// Whether the node has finished its configured rounds.
    pub finished: bool,
    /// Whether the store is full (its quota reached, or the disk out of
    /// space): the node then serves what it holds and keeps its peers, but
    /// takes no new deltas or versions until there is room again.
    pub disk_full: bool,
    /// Why, when it is.
    pub disk_full_reason: Option<String>,
    /// Bytes the store occupied when last measured.
    pub store_bytes: u64,
    /// Rounds behind the head the last collection kept: `keep_versions`,
    /// or fewer when that many would not fit the store's quota.
    pub keep_rounds: u64,
    /// The federation of regions, if this region takes part in one.
    pub federation: Option<FederationStatus>,
    /// How this node is reached: AutoNAT's verdict, its connections
    /// (direct or relayed), hole punches, relay reservations and circuits.
    pub reach: crate::net::Reach,
}

/// What `/status` shows of a federation of regions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FederationStatus {
    /// Heads are mixed after every round that is a multiple of this.
    pub every: u64,
    /// The neighbouring regions.
    pub neighbours: Vec<String>,
    /// Foreign heads taken (each on its region's attestations) since start.
    pub foreign_heads_taken: u64,
    /// Versions a neighbour's members named for a mix round that were not
    /// taken (too few of that region's members vouched for them, or they
    /// failed a check), since start.
    pub foreign_heads_refused: u64,
    /// Mixes this node signed since start.
    pub mixes_signed: u64,
    /// The last mix this node signed: its round, its own region's head
    /// and the foreign heads mixed in.
    pub last_mix: Option<LastMix>,
}

/// The last mix of regions a node signed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LastMix {
    /// The mix round.
    pub round: u64,
    /// The region's own head it mixed (manifest id).
    pub own_head: String,
    /// The foreign heads mixed in.
    pub foreign: Vec<ForeignHeadStatus>,
}

/// A foreign head mixed in.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForeignHeadStatus {
    /// Its region.
    pub region: String,
    /// Its manifest id.
    pub head: String,
    /// How many of its region's roster members vouched for it (for a head
    /// this node had taken before, the threshold it met then).
    pub vouchers: usize,
    /// L2 distance between its parameters and the own head's.
    pub distance: f64,
}

/// The node's loop must show it is alive at least this often (it ticks
/// every 2 s even with nothing to do).
pub const NODE_LOOP_BOUND: Duration = Duration::from_secs(10);
/// The network task must show it is alive at least this often (it ticks
/// every 5 s even with nothing to do).
pub const NET_TASK_BOUND: Duration = Duration::from_secs(15);

/// When the node's loop and the network task last showed they were alive:
/// what `GET /health` judges by.
#[derive(Debug, Default)]
pub struct Health {
    node: Mutex<Option<Instant>>,
    net: Mutex<Option<Instant>>,
}

impl Health {
    /// The node's loop is alive now; the network task was at `net`.
    pub fn ticked(&self, net: Option<Instant>) {
        if let Ok(mut n) = self.node.lock() {
            *n = Some(Instant::now());
        }
        if let Ok(mut n) = self.net.lock() {
            *n = net;
        }
    }

    /// Healthy, or why not.
    pub fn check(&self) -> Result<(), String> {
        let node = self.node.lock().map_err(|_| "poisoned")?.to_owned();
        let net = self.net.lock().map_err(|_| "poisoned")?.to_owned();
        let late = |at: Option<Instant>, bound: Duration, what: &str| match at {
            None => Err(format!("the {what} has not started")),
            Some(t) if t.elapsed() > bound => Err(format!(
                "the {what} has been silent for {:.0} s (bound {} s)",
                t.elapsed().as_secs_f64(),
                bound.as_secs()
            )),
            Some(_) => Ok(()),
        };
        late(node, NODE_LOOP_BOUND, "node loop")?;
        late(net, NET_TASK_BOUND, "network task")
    }
}

/// Why the store takes no new data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFull {
    /// The store has grown past its quota.
    Quota {
        /// Bytes it occupies.
        used: u64,
        /// Its quota.
        quota: u64,
    },
    /// A write found the disk out of space.
    NoSpace,
}

impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskFull::Quota { used, quota } => write!(
                f,
                "the store holds {} MiB, over its quota of {} MiB",
                used >> 20,
                quota >> 20
            ),
            DiskFull::NoSpace => f.write_str("the disk is out of space"),
        }
    }
}

/// Whether the store is full, shared by the node's loop and its blocking
/// tasks (which find out first when a write fails).
#[derive(Debug, Default)]
pub struct Disk {
    full: Mutex<Option<DiskFull>>,
    /// The store's quota, if it has one.
    quota: Mutex<Option<u64>>,
    /// Bytes the store occupied when last measured, plus what the node
    /// wrote since: the quota is checked at every write, not only at every
    /// measurement.
    used: std::sync::atomic::AtomicU64,
}

impl Disk {
    /// Sets the store's quota.
    pub(crate) fn set_quota(&self, quota: Option<u64>) {
        if let Ok(mut q) = self.quota.lock() {
            *q = quota;
        }
    }

    /// The store's quota.
    pub(crate) fn quota(&self) -> Option<u64> {
        self.quota.lock().map(|q| *q).unwrap_or(None)
    }

    /// The store's size as last measured, plus what was written since.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A measurement of the store's size.
    pub(crate) fn measured(&self, bytes: u64) {
        self.used.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The node is about to write about `bytes`: whether they fit under
    /// `limit` of the quota (counted as written if they do).
    pub(crate) fn fits(&self, bytes: u64, limit: fn(u64) -> u64) -> bool {
        let used = self.used.load(std::sync::atomic::Ordering::Relaxed);
        if self
            .quota()
            .is_some_and(|q| used.saturating_add(bytes) > limit(q))
        {
            return false;
        }
        self.used
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Why the store is full, if it is.
    pub fn full(&self) -> Option<DiskFull> {
        self.full.lock().map(|f| *f).unwrap_or(None)
    }

    /// Sets (or clears) the state; returns the previous one.
    pub(crate) fn set(&self, state: Option<DiskFull>) -> Option<DiskFull> {
        match self.full.lock() {
            Ok(mut f) => std::mem::replace(&mut *f, state),
            Err(_) => None,
        }
    }
}

/// State shared with the HTTP API.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The status.
    pub status: Arc<Mutex<Status>>,
    /// The head manifest.
    pub head: Arc<Mutex<Option<Verified<ModelManifest>>>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Whether the node's loop and network task are alive.
    pub health: Arc<Health>,
    /// Whether the store is full.
    pub disk: Arc<Disk>,
    /// Chunks the node's fetches hold before storing them (served to peers
    /// fetching the same payload).
    pub inflight: Arc<crate::inflight::InFlight>,
    /// The chunks of this node's own recent deltas (to count its upload as
    /// an author).
    pub own: Arc<crate::inflight::OwnChunks>,
    /// Payloads in the store before their manifests (garbage collection
    /// keeps them).
    pub landing: Arc<crate::inflight::Landing>,
}

impl Shared {
    /// Fresh shared state.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            status: Arc::new(Mutex::new(Status::default())),
            head: Arc::new(Mutex::new(None)),
            metrics,
            health: Arc::default(),
            disk: Arc::default(),
            inflight: Arc::default(),
            own: Arc::default(),
            landing: Arc::default(),
        }
    }

    /// Marks the store full (or not); logs and shows the change.
    pub(crate) fn set_disk_full(&self, state: Option<DiskFull>) {
        let was = self.disk.set(state);
        if was != state {
            match state {
                Some(why) => {
                    tracing::warn!(%why, "store full: serving what it holds, taking no new data")
                }
                None => tracing::info!("store has room again: taking new data"),
            }
        }
        self.metrics.disk_full.set(i64::from(state.is_some()));
    }

    /// A copy of the status. Its counters are read from the metrics, so
    /// `/status` and `/metrics` always say the same.
    pub fn status(&self) -> Status {
        let mut s = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        let m = &self.metrics;
        s.bytes_in = m.bytes_in.get();
        s.bytes_out = m.bytes_out.get();
        s.own_bytes_out = m.own_bytes_out.get();
        s.deltas_accepted = m.deltas_accepted.get();
        s.versions_verified = m.versions_verified.get();
        s.versions_attested = m.versions_attested.get();
        s.versions_matched = m.versions_matched.get();
        s.verify_fetched_bytes = m.verify_fetched_bytes.get();
        s.recompute_ms = m.recompute_seconds.get() * 1e3;
        s.keep_verified_ms = m.keep_verified_seconds.get() * 1e3;
        s.stage_ms = m.stage_ms();
        s.rejected = m.rejected();
        s.store_chunk_bytes = m.store_chunk_bytes.get().max(0) as u64;
        s.store_manifests = m.store_manifests.get().max(0) as u64;
        s.store_bytes = m.store_bytes.get().max(0) as u64;
        let full = self.disk.full();
        s.disk_full = full.is_some();
        s.disk_full_reason = full.map(|f| f.to_string());
        s
    }

    /// Changes the status in place.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_counts_what_the_metrics_count() {
        let metrics = Metrics::new(prometheus_client::registry::Registry::default());
        let shared = Shared::new(Arc::new(metrics));
        let m = &shared.metrics;
        m.bytes_in.inc_by(10);
        m.bytes_out.inc_by(7);
        m.deltas_accepted.inc();
        m.versions_verified.inc_by(3);
        m.versions_matched.inc();
        m.versions_attested.inc_by(2);
        m.verify_fetched_bytes.inc_by(64);
        m.recompute_seconds.inc_by(0.5);
        m.keep_verified_seconds.inc_by(0.25);
        shared.update(|s| s.round = 4);
        let s = shared.status();
        assert_eq!(
            (s.bytes_in, s.bytes_out, s.deltas_accepted, s.round),
            (10, 7, 1, 4)
        );
        assert_eq!(
            (s.versions_verified, s.versions_matched, s.versions_attested),
            (3, 1, 2)
        );
        assert_eq!(s.verify_fetched_bytes, 64);
        assert_eq!((s.recompute_ms, s.keep_verified_ms), (500.0, 250.0));
        let text = m.encode();
        assert!(
            text.contains("tapestry_versions_verified_total 3"),
            "{text}"
        );
        assert!(text.contains("tapestry_bytes_in_total 10"), "{text}");
    }
}
