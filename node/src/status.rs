//! What the node shows of itself: the `/status` document and the state
//! shared between the running node and the HTTP API (which depends on
//! this module, not on the runtime).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    /// Test accuracy of the head on the local evaluation split.
    pub accuracy: Option<f32>,
    /// Test loss of the head on the local evaluation split.
    pub loss: Option<f32>,
    /// Connected peers.
    pub peers: usize,
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Application bytes received (gossip and fetched chunks).
    pub bytes_in: u64,
    /// Application bytes sent (gossip and served chunks).
    pub bytes_out: u64,
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
    /// Peers' versions found to be the same computation as one this node
    /// made or verified (checked by comparison, not recomputed).
    pub versions_matched: u64,
    /// Whether the node has finished its configured rounds.
    pub finished: bool,
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
}

impl Shared {
    /// Fresh shared state.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            status: Arc::new(Mutex::new(Status::default())),
            head: Arc::new(Mutex::new(None)),
            metrics,
        }
    }

    /// A copy of the status.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Changes the status in place.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}
