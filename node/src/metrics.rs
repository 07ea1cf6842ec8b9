//! The node's Prometheus metrics, in one registry with libp2p's own.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `reason` label of rejections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why (a stable label such as `bad_signature`, `replay`, `non_finite`).
    pub reason: String,
}

/// The `params` label of the head metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Head {
    /// The head's parameter digest (first 16 hex digits): equal on nodes
    /// that hold the same model, whoever signed their versions.
    pub params: String,
}

/// A stage of the node's work on rounds, timed for the
/// `tapestry_stage_seconds` metric and `/status`' `stage_ms`. Stages
/// overlap in time (payloads are fetched while the node trains; chunk
/// checks run inside fetches), so their sum is not a round's duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Local training (on the model thread).
    Train,
    /// Evaluating a new head on the local split (on the model thread).
    Evaluate,
    /// This node's delta: difference, codec with error feedback, norm.
    Encode,
    /// BLAKE3 content ids of what this node makes (its payloads, its
    /// versions' parameters).
    Hash,
    /// Signing this node's manifests.
    Sign,
    /// Writing to the store: this node's payloads, admitted deltas, new
    /// heads and verified versions (flushes included).
    Store,
    /// Announcing: gossip publishing and DHT provider records.
    Announce,
    /// A delta payload's fetch, from asking to holding every chunk (its
    /// chunk checks included), summed over fetches running side by side.
    Fetch,
    /// BLAKE3 checks of chunks peers served (inside `fetch`).
    CheckChunks,
    /// Peers' payloads through the door: decoded and checked.
    Decode,
    /// Closing rounds: the aggregation rule and the outer step.
    Aggregate,
    /// Recomputing peers' versions to verify them (as `recompute_seconds`).
    Verify,
    /// The rest of taking a new head: copies, status, collection of old
    /// versions (storing and announcing it excluded).
    Adopt,
    /// The rest of the round engine's handling: bookkeeping and copies
    /// outside the stages above.
    Engine,
}

impl Stage {
    /// Every stage, in the order of a round.
    pub const ALL: [Stage; 14] = [
        Stage::Train,
        Stage::Evaluate,
        Stage::Encode,
        Stage::Hash,
        Stage::Sign,
        Stage::Store,
        Stage::Announce,
        Stage::Fetch,
        Stage::CheckChunks,
        Stage::Decode,
        Stage::Aggregate,
        Stage::Verify,
        Stage::Adopt,
        Stage::Engine,
    ];

    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Train => "train",
            Stage::Evaluate => "evaluate",
            Stage::Encode => "encode",
            Stage::Hash => "hash",
            Stage::Sign => "sign",
            Stage::Store => "store",
            Stage::Announce => "announce",
            Stage::Fetch => "fetch",
            Stage::CheckChunks => "check_chunks",
            Stage::Decode => "decode",
            Stage::Aggregate => "aggregate",
            Stage::Verify => "verify",
            Stage::Adopt => "adopt",
            Stage::Engine => "engine",
        }
    }
}

/// The `stage` label of the stage timings.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// [`Stage::label`].
    pub stage: String,
}

/// Every metric the node exports.
#[derive(Debug)]
pub struct Metrics {
    /// Rounds completed (versions adopted).
    pub rounds: Counter,
    /// The current round.
    pub round: Gauge,
    /// Deltas accepted from gossip.
    pub deltas_accepted: Counter,
    /// Messages and deltas rejected, by reason (count with
    /// [`Metrics::reject`], read with [`Metrics::rejected`]).
    deltas_rejected: Family<Reason, Counter>,
    /// The same counts, readable (a family cannot be listed).
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Chunks served to peers.
    pub chunks_served: Counter,
    /// Chunks fetched from peers (verified).
    pub chunks_fetched: Counter,
    /// Application bytes received.
    pub bytes_in: Counter,
    /// Application bytes sent.
    pub bytes_out: Counter,
    /// Bytes of this node's own deltas' chunks served to peers (its
    /// upload as an author; with swarming about one copy per delta).
    pub own_bytes_out: Counter,
    /// Test accuracy of the head on the local split.
    pub accuracy: Gauge<f64, AtomicU64>,
    /// A language model's bits per byte on the local held-out text.
    pub bits_per_byte: Gauge<f64, AtomicU64>,
    /// Connected peers.
    pub peers: Gauge,
    /// 1 for the head's parameter digest (one series per node): counting
    /// the distinct digests across nodes tells whether they agree.
    pub head: Family<Head, Gauge>,
    /// Peers' versions verified by recomputation.
    pub versions_verified: Counter,
    /// Peers' versions taken on roster members' attestations.
    pub versions_attested: Counter,
    /// Peers' versions with the same inputs as one this node made or
    /// verified (compared, not recomputed).
    pub versions_matched: Counter,
    /// Time spent recomputing peers' versions (door checks, aggregation,
    /// outer step, hashing and comparing the result; fetching and storing
    /// excluded), in seconds.
    pub recompute_seconds: Counter<f64, AtomicU64>,
    /// Time spent storing the versions this node recomputed, in seconds.
    pub keep_verified_seconds: Counter<f64, AtomicU64>,
    /// Time spent in each [`Stage`], in seconds.
    pub stage_seconds: Family<StageLabel, Counter<f64, AtomicU64>>,
    /// Delta payload bytes fetched only to verify a version (deltas this
    /// node had not received by gossip).
    pub verify_fetched_bytes: Counter,
    /// Chunk bytes the store held after its last collection.
    pub store_chunk_bytes: Gauge,
    /// Manifests (versions and deltas) the store held after its last
    /// collection.
    pub store_manifests: Gauge,
    /// Chunk bytes garbage collection deleted.
    pub gc_deleted_bytes: Counter,
    /// Peers' requests answered `Busy` (too many reads in flight).
    pub requests_busy: Counter,
    /// Gossip messages the node had no room to check (reported `Ignore`).
    pub gossip_shed: Counter,
    /// 1 while the store is full (quota reached or disk out of space).
    pub disk_full: Gauge,
    /// Chunks of the head whose files were lost and fetched again.
    pub chunks_refetched: Counter,
    /// Bytes the store occupied when last measured.
    pub store_bytes: Gauge,
    /// The store's quota in bytes (0: none).
    pub store_quota_bytes: Gauge,
    /// The registry (ours and libp2p's), for encoding.
    pub registry: Mutex<Registry>,
}

impl Metrics {
    /// Registers our metrics in `registry` (which may already hold
    /// libp2p's).
    pub fn new(mut registry: Registry) -> Metrics {
        let m = Metrics {
            rounds: Counter::default(),
            round: Gauge::default(),
            deltas_accepted: Counter::default(),
            rejected: Mutex::default(),
            deltas_rejected: Family::default(),
            chunks_served: Counter::default(),
            chunks_fetched: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            own_bytes_out: Counter::default(),
            accuracy: Gauge::default(),
            bits_per_byte: Gauge::default(),
            peers: Gauge::default(),
            head: Family::default(),
            versions_verified: Counter::default(),
            versions_attested: Counter::default(),
            versions_matched: Counter::default(),
            recompute_seconds: Counter::default(),
            keep_verified_seconds: Counter::default(),
            stage_seconds: Family::default(),
            verify_fetched_bytes: Counter::default(),
            store_chunk_bytes: Gauge::default(),
            store_manifests: Gauge::default(),
            gc_deleted_bytes: Counter::default(),
            requests_busy: Counter::default(),
            gossip_shed: Counter::default(),
            disk_full: Gauge::default(),
            chunks_refetched: Counter::default(),
            store_bytes: Gauge::default(),
            store_quota_bytes: Gauge::default(),
            registry: Mutex::new(Registry::default()),
        };
        let r = registry.sub_registry_with_prefix("tapestry");
        r.register("rounds", "Rounds completed", m.rounds.clone());
        r.register("round", "Current round", m.round.clone());
        r.register(
            "deltas_accepted",
            "Deltas accepted from gossip",
            m.deltas_accepted.clone(),
        );
        r.register(
            "deltas_rejected",
            "Deltas and messages rejected, by reason",
            m.deltas_rejected.clone(),
        );
        r.register(
            "own_bytes_out",
            "Bytes of this node's own deltas served to peers",
            m.own_bytes_out.clone(),
        );
        r.register(
            "chunks_served",
            "Chunks served to peers",
            m.chunks_served.clone(),
        );
        r.register(
            "chunks_fetched",
            "Chunks fetched and verified",
            m.chunks_fetched.clone(),
        );
        r.register("bytes_in", "Application bytes received", m.bytes_in.clone());
        r.register(
            "store_chunk_bytes",
            "Chunk bytes the store held after its last garbage collection",
            m.store_chunk_bytes.clone(),
        );
        r.register(
            "store_manifests",
            "Manifests the store held after its last garbage collection",
            m.store_manifests.clone(),
        );
        r.register(
            "requests_busy",
            "Peers' chunk and manifest requests answered Busy (too many in flight)",
            m.requests_busy.clone(),
        );
        r.register(
            "disk_full",
            "1 while the store is full (its quota reached or the disk out of space): no new data is taken",
            m.disk_full.clone(),
        );
        r.register(
            "chunks_refetched",
            "Chunks of the head whose files were lost from the store and fetched again from peers",
            m.chunks_refetched.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes the store occupied when last measured",
            m.store_bytes.clone(),
        );
        r.register(
            "store_quota_bytes",
            "The store's quota in bytes (0: none)",
            m.store_quota_bytes.clone(),
        );
        r.register(
            "gossip_shed",
            "Gossip messages the node had no room to check (reported Ignore, not forwarded)",
            m.gossip_shed.clone(),
        );
        r.register(
            "gc_deleted_bytes",
            "Chunk bytes deleted by garbage collection",
            m.gc_deleted_bytes.clone(),
        );
        r.register("bytes_out", "Application bytes sent", m.bytes_out.clone());
        r.register(
            "accuracy",
            "Test accuracy of the head on the local evaluation split",
            m.accuracy.clone(),
        );
        r.register(
            "bits_per_byte",
            "Bits per byte of the head on the local held-out text (language models)",
            m.bits_per_byte.clone(),
        );
        r.register("peers", "Connected peers", m.peers.clone());
        r.register(
            "head",
            "1 for the parameter digest of the head (nodes that agree show the same)",
            m.head.clone(),
        );
        r.register(
            "versions_verified",
            "Peers' versions verified by recomputation",
            m.versions_verified.clone(),
        );
        r.register(
            "versions_attested",
            "Peers' versions taken on roster members' attestations",
            m.versions_attested.clone(),
        );
        r.register(
            "versions_matched",
            "Peers' versions with the same inputs as one made or verified here (compared, not recomputed)",
            m.versions_matched.clone(),
        );
        r.register(
            "recompute_seconds",
            "Time spent recomputing peers' versions (fetching and storing excluded)",
            m.recompute_seconds.clone(),
        );
        r.register(
            "keep_verified_seconds",
            "Time spent storing recomputed versions",
            m.keep_verified_seconds.clone(),
        );
        r.register(
            "stage_seconds",
            "Time spent in each stage of the work on rounds (stages overlap in time)",
            m.stage_seconds.clone(),
        );
        r.register(
            "verify_fetched_bytes",
            "Delta bytes fetched only to verify a version",
            m.verify_fetched_bytes.clone(),
        );
        // The usual reasons start at zero, so the series exist (and rates
        // work) before the first rejection.
        for reason in tapestry_core::admission::Rejection::USUAL_LABELS {
            let _zero = m.deltas_rejected.get_or_create(&Reason {
                reason: reason.into(),
            });
        }
        if let Ok(mut slot) = m.registry.lock() {
            *slot = registry;
        }
        m
    }

    /// Makes `params` the head's digest (the previous one's series goes).
    pub fn set_head(&self, params: &str) {
        let params: String = params.chars().take(16).collect();
        self.head.clear();
        self.head.get_or_create(&Head { params }).set(1);
    }

    /// Counts one rejection.
    pub fn reject(&self, reason: &'static str) {
        self.deltas_rejected
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
        if let Ok(mut counts) = self.rejected.lock() {
            *counts.entry(reason).or_default() += 1;
        }
    }

    /// Rejections so far, by reason (reasons never seen are left out).
    pub fn rejected(&self) -> BTreeMap<String, u64> {
        self.rejected
            .lock()
            .map(|c| c.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
            .unwrap_or_default()
    }

    /// Adds `took` to a stage's time.
    pub fn time(&self, stage: Stage, took: std::time::Duration) {
        self.stage_seconds
            .get_or_create(&StageLabel {
                stage: stage.label().to_owned(),
            })
            .inc_by(took.as_secs_f64());
    }

    /// The time spent in each stage so far, milliseconds, by label.
    pub fn stage_ms(&self) -> BTreeMap<String, f64> {
        Stage::ALL
            .iter()
            .map(|s| {
                let label = StageLabel {
                    stage: s.label().to_owned(),
                };
                (
                    s.label().to_owned(),
                    self.stage_seconds.get_or_create(&label).get() * 1e3,
                )
            })
            .collect()
    }

    /// Sets the accuracy gauge.
    pub fn set_accuracy(&self, accuracy: f32) {
        self.accuracy.set(f64::from(accuracy));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }
}
