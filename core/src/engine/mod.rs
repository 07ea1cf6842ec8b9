//! The round engine, sans-IO: inputs and the current time go in, actions come
//! out. It owns no socket, spawns nothing, reads no clock, and draws its
//! randomness from a seed, so the real node and the simulator run this very
//! code and the same inputs give byte-identical model versions. (A shell may
//! lend it a stopwatch to time its heavy steps, [`Engine::set_stopwatch`];
//! what it reads there is reported, never decided on.)
//!
//! One round, region-broadcast mode (DESIGN.md, steps 1–7):
//! 1. [`Action::Train`] from the current model θ (the shell runs
//!    [`crate::model::train_local`] off its event loop and answers with
//!    [`Input::TrainingDone`]).
//! 2. Δ = θ − θ′, encoded with error feedback, cut into chunks, described by
//!    a signed [`DeltaManifest`]: [`Action::Publish`].
//! 3. Peers' manifests arrive ([`Input::DeltaAnnounced`]); the door checks
//!    them and the engine asks for their chunks ([`Action::Fetch`]); the
//!    payload arrives ([`Input::DeltaPayload`]) and is checked again.
//! 4. The round closes on quorum (deltas from a fraction of the known peers,
//!    own included) or at its deadline. Deltas of this round and, within the
//!    staleness window, late ones of earlier rounds are aggregated with the
//!    configured rule; the outer optimiser moves θ; the new version's signed
//!    [`ModelManifest`] names its parent and every delta used:
//!    [`Action::Adopt`].
//! 5. A node that sees a version of a later round than its own (it fell
//!    behind, or just joined) adopts it instead of replaying history.
//!
//! In neighbour-mixing mode ([`Mode::Mixing`]) step 2–4 differ: the trained
//! model goes to the node's neighbours ([`Action::SendToNeighbours`]), and
//! the round closes when every neighbour's model for it arrived (or at the
//! deadline) by mixing them with Metropolis–Hastings weights.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tapestry_protocol::{
    Codec, ContentId, DeltaManifest, ErrorFeedback, Keypair, ModelManifest, NodeId, Signed,
    Verified,
};

use crate::aggregate::{
    AggregateError, AggregationRule, Held, Payload, PayloadSource, Values, fixed_width,
};
use crate::door::{Door, DoorConfig, Rejected};
use crate::mixing::PushSum;
use crate::model::ModelSpec;
use crate::outer::OuterOptimizer;
use crate::verify::{DeltaInput, aggregate_onto_owned, merge_params, params_chunk_ids};

mod io;
mod modes;
mod rank;
mod stages;
mod versions;

pub use io::{Action, Input};
pub use rank::{VersionRank, params_digest, version_rank};
pub use stages::StageTimes;
pub use versions::genesis;

/// Settings of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The model.
    pub model_id: String,
    /// The region.
    pub region: String,
    /// The architecture.
    pub spec: ModelSpec,
    /// How deltas are encoded.
    pub codec: Codec,
    /// Chunk size of payloads.
    pub chunk_size: usize,
    /// How deltas are combined.
    pub rule: AggregationRule,
    /// How the combined delta moves the model.
    pub outer: OuterOptimizer,
    /// How this region mixes its head with other regions' heads, if it
    /// federates ([`crate::federation`]).
    pub federation: Option<crate::federation::Federation>,
    /// Fraction of known peers (plus this node) whose deltas close a round.
    pub quorum: f64,
    /// A round closes at the latest this long after it started.
    pub round_timeout_ms: u64,
    /// Door limits (staleness window included).
    pub door: DoorConfig,
    /// Region broadcast or neighbour mixing.
    pub mode: Mode,
    /// Seed of this engine's randomness (training order).
    pub seed: u64,
}

/// How a round's results are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every delta reaches every node of the region; each node aggregates
    /// them all (nearly the exact average). For tens of nodes.
    Broadcast,
    /// Each node sends its trained model to its neighbours (its current
    /// peers) and mixes what it receives with Metropolis–Hastings weights
    /// (D-PSGD, Lian et al. 2017). Scales to thousands; converges at the rate
    /// of the graph's spectral gap.
    Mixing,
    /// Push-sum (Kempe et al. 2003; stochastic gradient push, Assran et al.
    /// 2019): each node keeps a value `x` and a weight `w`, its model is
    /// `x / w`; after training it keeps one share of both and pushes equal
    /// shares to `fanout` peers chosen at random. Needs no symmetric links and
    /// tolerates lost messages (value and weight are lost together), so the
    /// models still agree.
    PushSum {
        /// Peers each share goes to per round.
        fanout: usize,
    },
}

/// A pending delta's payload as it reaches the engine
/// ([`Input::DeltaPayload`], [`Input::DeltaStored`]).
enum Arrived {
    /// The payload's bytes.
    Whole(std::sync::Arc<Vec<u8>>),
    /// Where the shell kept it as it arrived.
    Stored(std::sync::Arc<dyn PayloadSource + Send + Sync>),
}

/// A delta admitted at the door.
#[derive(Debug, Clone)]
struct Received {
    id: ContentId,
    round: u64,
    author: NodeId,
    sample_count: u64,
    /// Its values: its payload (decoded as aggregation reads it), or, once
    /// the shell has stored an `f32`/`bf16` payload, that stored payload
    /// read from the store ([`Engine::payload_stored`]), or this node's own
    /// decoded delta until then; `None` once a version of this node
    /// aggregated it (never aggregated twice: see [`Engine::start_round`]).
    values: Option<Held>,
    manifest: Verified<DeltaManifest>,
}

/// The state machine of one node.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    key: Keypair,
    door: Door,
    rng: ChaCha8Rng,
    round: u64,
    round_started_ms: u64,
    /// When the pending wake-up fires.
    timer_ms: u64,
    training: bool,
    /// The version the training under way started from (its result is
    /// taken if the node still holds these parameters, under whichever id).
    training_from: Option<ContentId>,
    /// The head's parameters (shared with the shell's copy in
    /// [`Action::Adopt`]: one buffer, not two).
    params: std::sync::Arc<Vec<f32>>,
    /// The parameters of the head's parent, kept while the outer step has
    /// momentum and the head is a plain version: the step the next version
    /// continues ([`crate::verify::previous_step_parent`]). `None` when
    /// there is no such step, or when it is not known here (then this node
    /// does not close a round itself; it adopts a peer's version).
    previous: Option<std::sync::Arc<Vec<f32>>>,
    version: Option<ContentId>,
    /// The parents of `version` (how the fork choice tells a rival version
    /// of the same round on another branch from a mere alternative).
    parents: Vec<ContentId>,
    rank: VersionRank,
    seq: u64,
    feedback: ErrorFeedback,
    peers: BTreeSet<NodeId>,
    /// When each peer joined (`now_ms`): before it has sent anything it
    /// counts towards quorum for one round timeout ([`Engine::takes_part`]).
    joined: BTreeMap<NodeId, u64>,
    /// When a signed delta of each peer for this model and region was last
    /// heard (`now_ms`), whatever its round: a peer counts towards quorum
    /// while it takes part.
    heard: BTreeMap<NodeId, u64>,
    pending: BTreeMap<ContentId, Verified<DeltaManifest>>,
    /// Pending deltas that passed the door before (their values were
    /// dropped once used, and the head no longer counts them as used):
    /// decoded again when their payload is back, not judged again.
    readmit: BTreeSet<ContentId>,
    received: BTreeMap<ContentId, Received>,
    /// Deltas aggregated into this node's recent lineage, with the round of
    /// the version that used them: never aggregated again.
    used: BTreeMap<ContentId, u64>,
    /// One vote per author per round: the delta admitted for each.
    votes: BTreeMap<(u64, NodeId), ContentId>,
    /// Each author's last sequence number seen, and that delta's round
    /// (forgotten once the round is past the staleness window: the door
    /// refuses anything that old anyway).
    last_seq: BTreeMap<NodeId, (u64, u64)>,
    /// Wall-clock milliseconds at `now_ms` = 0 (see [`Engine::set_wall_clock`]).
    wall_base_ms: u64,
    /// The time of the input being handled.
    now_ms: u64,
    trained: Option<Vec<f32>>,
    neighbour_models: BTreeMap<(u64, NodeId), (Vec<f32>, usize)>,
    push_sum: Option<PushSum>,
    /// A federating region's wait for foreign heads after its plain
    /// version of a mix round: (that version, until when); once the time
    /// is up, or the head moved on, the node trains without them.
    wait: Option<(ContentId, u64)>,
    /// The shell's stopwatch, if it lent one, and what it timed so far.
    stopwatch: Option<fn() -> std::time::Instant>,
    stages: StageTimes,
}

impl Engine {
    /// A new engine; it does nothing until [`Input::Start`].
    pub fn new(config: EngineConfig, key: Keypair) -> Self {
        let n = config.spec.n_params();
        let door = Door::new(
            config.door.clone(),
            &config.model_id,
            &config.region,
            config.spec.layout(),
        );
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Self {
            config,
            key,
            door,
            rng,
            round: 0,
            round_started_ms: 0,
            timer_ms: 0,
            training: false,
            training_from: None,
            params: std::sync::Arc::new(vec![0.0; n]),
            previous: None,
            version: None,
            parents: Vec::new(),
            rank: VersionRank::default(),
            seq: 0,
            feedback: ErrorFeedback::new(n),
            peers: BTreeSet::new(),
            joined: BTreeMap::new(),
            heard: BTreeMap::new(),
            pending: BTreeMap::new(),
            readmit: BTreeSet::new(),
            received: BTreeMap::new(),
            used: BTreeMap::new(),
            votes: BTreeMap::new(),
            last_seq: BTreeMap::new(),
            wall_base_ms: 0,
            now_ms: 0,
            trained: None,
            neighbour_models: BTreeMap::new(),
            push_sum: None,
            wait: None,
            stopwatch: None,
            stages: StageTimes::default(),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.key.node_id()
    }

    /// Numbers this node's next announcements after `seq`. Peers refuse a
    /// sequence number not above the last one they saw from this node, so
    /// a restarted node must not start again from zero: the shell passes a
    /// clock reading (milliseconds since the epoch), which exceeds every
    /// number used before the restart unless the node announced more than
    /// one delta per millisecond.
    pub fn continue_sequence_after(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// Tells the engine the wall-clock time (milliseconds since the epoch)
    /// at `now_ms` = 0, so the manifests it signs carry their creation time
    /// (`created_unix_ms`, informative). Without it they carry `now_ms`
    /// itself (virtual time, in the simulator). The genesis carries 0, so
    /// every node derives the same one.
    pub fn set_wall_clock(&mut self, unix_ms_at_zero: u64) {
        self.wall_base_ms = unix_ms_at_zero;
    }

    /// Creation time for a manifest signed now.
    pub(crate) fn wall_ms(&self) -> u64 {
        self.wall_base_ms.saturating_add(self.now_ms)
    }

    /// Whether the engine admitted delta `id`'s payload (it passed the door
    /// and may be, or was, aggregated).
    pub fn holds_delta(&self, id: &ContentId) -> bool {
        self.received.contains_key(id) || self.used.contains_key(id)
    }

    /// The deltas of the staleness window this engine holds or has admitted
    /// (its own included): it may still aggregate them, and peers verifying
    /// versions that did may ask for them, so the shell keeps them stored.
    pub fn window_deltas(&self) -> Vec<ContentId> {
        let mut ids: BTreeSet<ContentId> = self.votes.values().copied().collect();
        ids.extend(self.received.keys().copied());
        ids.extend(self.pending.keys().copied());
        ids.into_iter().collect()
    }

    /// Each author's last sequence number seen and its delta's round, for
    /// the shell to keep across a restart (see
    /// [`Engine::restore_sequences`]).
    pub fn sequences(&self) -> Vec<(NodeId, u64, u64)> {
        self.last_seq
            .iter()
            .map(|(id, (seq, round))| (*id, *seq, *round))
            .collect()
    }

    /// Restores what [`Engine::sequences`] gave before a restart, so a
    /// replayed announcement is refused after it as before it (the higher
    /// sequence number wins where both are known).
    pub fn restore_sequences(&mut self, entries: impl IntoIterator<Item = (NodeId, u64, u64)>) {
        for (id, seq, round) in entries {
            let e = self.last_seq.entry(id).or_insert((seq, round));
            if seq > e.0 {
                *e = (seq, round);
            }
        }
    }

    /// Its settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The current parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The parents of the current model version.
    pub fn head_parents(&self) -> &[ContentId] {
        &self.parents
    }

    /// The current model version's id.
    pub fn version(&self) -> Option<ContentId> {
        self.version
    }

    /// Whether peer `p` counts towards a round's quorum at `now_ms`: it
    /// joined less than a round timeout ago (a newcomer, or every peer just
    /// after this node starts, is waited for until it can show it trains),
    /// or a signed delta of its was heard in the last (staleness + 1) round
    /// timeouts. A subscriber that only listens stops holding rounds up one
    /// round timeout after it joined.
    fn takes_part(&self, p: &NodeId, now_ms: u64) -> bool {
        let timeout = self.config.round_timeout_ms;
        let active = timeout.saturating_mul(self.config.door.staleness.saturating_add(1));
        self.joined
            .get(p)
            .is_some_and(|&t| now_ms < t.saturating_add(timeout))
            || self
                .heard
                .get(p)
                .is_some_and(|&t| now_ms < t.saturating_add(active))
    }

    /// Handles one input at time `now_ms`; returns what to do.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Action> {
        self.now_ms = now_ms;
        let mut out = Vec::new();
        let o = &mut out;
        match input {
            Input::Start { manifest, params } => {
                self.adopt_version(manifest, std::sync::Arc::new(params), None, now_ms, o)
            }
            Input::PreviousStep { version, params } => {
                if self.config.outer.has_momentum()
                    && self.parents.as_slice() == [version]
                    && self.fits(&params)
                {
                    self.previous = Some(std::sync::Arc::new(params));
                    self.maybe_close(now_ms, o);
                }
            }
            Input::PeerJoined(p) => {
                if p != self.node_id() {
                    self.peers.insert(p);
                    self.joined.insert(p, now_ms);
                }
            }
            Input::PeerLeft(p) => {
                self.peers.remove(&p);
                self.joined.remove(&p);
                self.heard.remove(&p);
                self.maybe_close(now_ms, o);
            }
            Input::TrainingDone {
                round,
                version,
                params,
                samples,
            } => self.on_trained(round, version, params, samples, now_ms, o),
            Input::DeltaAnnounced(m) => self.on_announced(m, o),
            Input::OwnVote(m) => self.on_own_vote(m, o),
            Input::DeltaPayload { id, payload } => {
                self.on_arrived(id, Arrived::Whole(payload), now_ms, o)
            }
            Input::DeltaStored { id, source } => {
                self.on_arrived(id, Arrived::Stored(source), now_ms, o)
            }
            Input::ModelOffered {
                manifest,
                params,
                previous,
                authors,
                used,
                fork,
            } => self.on_model_offered(
                manifest,
                (params, previous),
                (authors, used, fork),
                now_ms,
                o,
            ),
            Input::BranchOffered {
                manifest,
                params,
                against,
                weights,
                used,
            } => self.on_branch_offered(manifest, params, against, weights, used, now_ms, o),
            Input::PushShare { x, w } => {
                if let Some(ps) = self.push_sum.as_mut() {
                    let fits = x.len() == ps.x.len() && x.iter().all(|v| v.is_finite());
                    if fits && w.is_finite() && w > 0.0 {
                        ps.absorb(&PushSum { x, w });
                    }
                }
            }
            Input::NeighbourModel {
                from,
                round,
                params,
                degree,
            } => self.on_neighbour_model(from, round, params, degree, now_ms, o),
            Input::CaughtUp { round, params } => {
                if self.config.mode != Mode::Broadcast && round > self.round && self.fits(&params) {
                    if matches!(self.config.mode, Mode::PushSum { .. }) {
                        self.push_sum = Some(PushSum::new(params.clone()));
                    }
                    self.params = std::sync::Arc::new(params);
                    self.previous = None;
                    let parents = self.version.into_iter().collect();
                    self.sign_version(round, parents, Vec::new(), now_ms, o);
                }
            }
            Input::ForeignHeads(heads) => self.on_foreign_heads(heads, now_ms, o),
            Input::Tick => self.maybe_close(now_ms, o),
        }
        out
    }

    /// The round whose foreign heads this node waits for
    /// ([`Input::ForeignHeads`]): its head is its region's plain version of
    /// a mix round of the federation, and the wait is not over. The shell
    /// gathers them when this turns `Some`.
    pub fn awaits_foreign_heads(&self) -> Option<u64> {
        match self.wait {
            Some((v, until)) if self.version == Some(v) && self.now_ms < until => Some(self.round),
            _ => None,
        }
    }

    /// Whether `params` could be this model's: the right length, all finite.
    fn fits(&self, params: &[f32]) -> bool {
        params.len() == self.params.len() && params.iter().all(|v| v.is_finite())
    }

    /// This node's training for `round` (from `version`) finished.
    fn on_trained(
        &mut self,
        round: u64,
        version: ContentId,
        params: Vec<f32>,
        samples: u64,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        if round != self.round || !self.training || self.training_from != Some(version) {
            return;
        }
        self.training = false;
        // Training that diverged (or a malformed result) contributes no
        // step, rather than stalling the round.
        let params = if self.fits(&params) {
            params
        } else {
            self.params.to_vec()
        };
        match self.config.mode {
            Mode::Broadcast => self.publish(params, samples, out),
            Mode::PushSum { fanout } => self.push(params, fanout, now_ms, out),
            Mode::Mixing => {
                out.push(Action::SendToNeighbours {
                    round,
                    params: params.clone(),
                    degree: self.peers.len(),
                });
                self.trained = Some(params);
            }
        }
        self.maybe_close(now_ms, out);
    }

    /// The vote this node cast before a restart: its one delta of that
    /// round, counted like a peer's (its payload fetched from the store).
    fn on_own_vote(&mut self, m: Verified<DeltaManifest>, out: &mut Vec<Action>) {
        let msg = m.message();
        if msg.author == self.node_id()
            && msg.model_id == self.config.model_id
            && msg.region == self.config.region
        {
            self.seq = self.seq.max(msg.seq);
            self.votes.insert((msg.round, msg.author), m.id());
            self.pending.insert(m.id(), m.clone());
            out.push(Action::Fetch { manifest: m });
        }
    }

    /// A pending delta's payload arrived, whole or kept by the shell as it
    /// came (a fixed-width one only): judged at the door — the payload, or
    /// read from where it is kept a block at a time — and admitted holding
    /// it, or its author penalised. A payload arriving again (its chunks
    /// match the ids it had when it passed the door, so these are the
    /// values it had then) is not judged twice; a whole one that does not
    /// decode now (it cannot) is left out without blame, and so is one the
    /// shell's own store failed to give back.
    fn on_arrived(&mut self, id: ContentId, arrived: Arrived, now_ms: u64, out: &mut Vec<Action>) {
        let Some(m) = self.pending.get(&id) else {
            return;
        };
        let msg = m.message();
        if matches!(arrived, Arrived::Stored(_)) && fixed_width(msg.codec).is_none() {
            // The shell keeps only fixed-width payloads as they arrive; it
            // sends any other whole ([`Input::DeltaPayload`]).
            return;
        }
        let lap = self.lap();
        let again = self.readmit.remove(&id);
        let checked = match (&arrived, again) {
            (Arrived::Whole(payload), true) => {
                self.door.check_decodes(msg, payload).map_err(|_| None)
            }
            (Arrived::Whole(payload), false) => self.door.check_payload(msg, payload).map_err(Some),
            (Arrived::Stored(_), true) => Ok(()),
            (Arrived::Stored(source), false) => self.door.check_source(msg, source.as_ref()),
        };
        self.charge(lap, |t| &mut t.decode);
        let Some(m) = self.pending.remove(&id) else {
            return;
        };
        match checked {
            Ok(()) => {
                // The payload, not its decoded values: aggregation decodes
                // it a block at a time, so no delta is ever held twice.
                let (codec, len) = (m.message().codec, self.door.n_values());
                let values = match arrived {
                    Arrived::Whole(payload) => Held::Encoded {
                        codec,
                        payload,
                        len,
                    },
                    Arrived::Stored(source) => Held::Stored { codec, source, len },
                };
                self.admit(m, values, now_ms, out);
            }
            Err(Some(r)) => out.push(Action::Penalise(r)),
            Err(None) => {}
        }
    }

    /// A delta that passed the door joins the round's received deltas,
    /// holding its values as `values`.
    fn admit(
        &mut self,
        m: Verified<DeltaManifest>,
        values: Held,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let msg = m.message();
        self.received.insert(
            m.id(),
            Received {
                id: m.id(),
                round: msg.round,
                author: msg.author,
                sample_count: msg.sample_count,
                values: Some(values),
                manifest: m,
            },
        );
        self.maybe_close(now_ms, out);
    }

    /// A verified version offered by the shell, with (its parameters, its
    /// parent's if the shell holds them and momentum needs them), (distinct
    /// authors, deltas used by it and its recent ancestors, fork weights).
    fn on_model_offered(
        &mut self,
        manifest: Verified<ModelManifest>,
        (params, previous): (std::sync::Arc<Vec<f32>>, Option<std::sync::Arc<Vec<f32>>>),
        (authors, used, fork): (usize, Vec<ContentId>, Option<(usize, usize)>),
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        // Catch up by adopting a later version instead of replaying, or
        // settle on the preferred version of this round.
        // With momentum the next step depends on the parent too: the same
        // parameters on other parents are another model's future.
        let same_params = manifest.message().round == self.round
            && params_digest(manifest.message()) == self.rank.params
            && self.version.is_some()
            && (!self.config.outer.has_momentum() || manifest.message().parents == self.parents);
        if same_params && self.prefers(manifest.message(), authors, fork) {
            // The same model under another signer's id (preferred by the
            // tie-break): take the id, keep the round going — training
            // under way started from these very parameters.
            // The head's own buffer, not the offered copy of the same
            // values (dropped here, not held while the shell stores and
            // evaluates the version).
            drop(params);
            out.push(Action::Adopt {
                manifest: manifest.clone(),
                params: self.params.clone(),
            });
            let round = manifest.message().round;
            self.used.extend(used.into_iter().map(|d| (d, round)));
            self.rank = version_rank(manifest.message(), authors);
            let old = self.version.replace(manifest.id());
            self.parents = manifest.message().parents.clone();
            // A wait for foreign heads on the old id goes on under the new
            // one: the same plain version of a mix round. Left on the old
            // id it would neither end (the wait is checked against the
            // head) nor let the node train (it waits instead), and in a
            // run's last round, where no peer's delta comes to close the
            // round, the node would stay there for good.
            if let Some((v, until)) = self.wait
                && old == Some(v)
            {
                if self.parents.len() == 1 {
                    self.wait = Some((manifest.id(), until));
                } else {
                    self.wait = None;
                    self.start_round(now_ms, out);
                }
            }
        } else if self.prefers(manifest.message(), authors, fork) && self.fits(&params) {
            // The shell stores it and makes it the head like any version
            // this node made.
            out.push(Action::Adopt {
                manifest: manifest.clone(),
                params: params.clone(),
            });
            let round = manifest.message().round;
            self.used = used.into_iter().map(|d| (d, round)).collect();
            // Its parent's parameters: the shell's, or the head's own when
            // it is the parent (a peer closed this node's round first).
            let previous = previous.or_else(|| {
                (manifest.message().parents.as_slice() == self.version.as_slice())
                    .then(|| self.params.clone())
            });
            self.adopt_version(manifest, params, previous, now_ms, out);
            self.rank = VersionRank {
                authors,
                ..self.rank
            };
        }
    }

    /// A verified branch to merge with the head `against`.
    #[allow(clippy::too_many_arguments)]
    fn on_branch_offered(
        &mut self,
        manifest: Verified<ModelManifest>,
        params: std::sync::Arc<Vec<f32>>,
        against: ContentId,
        (w_own, w_other): (f64, f64),
        used: Vec<ContentId>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let weights_ok = w_own.is_finite() && w_other.is_finite() && w_own > 0.0 && w_other > 0.0;
        let scope_ok = manifest.message().model_id == self.config.model_id
            && manifest.message().region == self.config.region;
        if self.version == Some(against)
            && against != manifest.id()
            && scope_ok
            && self.fits(&params)
            && weights_ok
        {
            let round = manifest.message().round;
            self.used.extend(used.into_iter().map(|d| (d, round)));
            self.merge_with(manifest, params, (w_own, w_other), now_ms, out);
        }
    }

    fn adopt_version(
        &mut self,
        manifest: Verified<ModelManifest>,
        params: std::sync::Arc<Vec<f32>>,
        previous: Option<std::sync::Arc<Vec<f32>>>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        if matches!(self.config.mode, Mode::PushSum { .. }) {
            self.push_sum = Some(PushSum::new(params.to_vec()));
        }
        self.round = manifest.message().round;
        self.version = Some(manifest.id());
        self.parents = manifest.message().parents.clone();
        self.rank = version_rank(manifest.message(), manifest.message().deltas.len());
        self.params = params;
        self.previous = previous.filter(|p| {
            self.config.outer.has_momentum()
                && self.parents.len() == 1
                && p.len() == self.params.len()
        });
        self.start_round(now_ms, out);
    }

    /// Whether a version of the next round already aggregates this node's
    /// own delta for its current round (trained and announced): taking it
    /// at once then loses none of this node's work, where waiting to close
    /// the round itself could wait for deltas that never arrive (lost in a
    /// flood) until the round's deadline.
    pub fn holds_own_vote(&self, m: &ModelManifest) -> bool {
        m.round == self.round.saturating_add(1)
            && !self.training
            && self
                .votes
                .get(&(self.round, self.node_id()))
                .is_some_and(|own| m.deltas.contains(own))
    }

    /// Whether an offered version could replace this node's once verified:
    /// it is of a later round (the node fell behind), or of the same round
    /// and, if every delta it names turns out to be a distinct author's,
    /// preferred by [`version_rank`]. The shell verifies only what passes.
    pub fn would_adopt(&self, m: &ModelManifest) -> bool {
        self.prefers(m, m.deltas.len(), None)
    }

    /// Whether a verified version with `authors` distinct authors replaces
    /// this node's. With `fork` = (weight of this node's head, weight of
    /// the offered version) since their lineages parted
    /// ([`crate::verify::fork_weights`]): the heavier wins, then the later
    /// round, then [`version_rank`] (the fork choice: votes cast, not
    /// rounds claimed). Without it: a later round, or the same round and
    /// preferred by [`version_rank`] (two nodes that closed a round on
    /// different sets of deltas settle on one version; every node picks the
    /// same one).
    pub fn prefers(&self, m: &ModelManifest, authors: usize, fork: Option<(usize, usize)>) -> bool {
        if m.model_id != self.config.model_id || m.region != self.config.region {
            return false;
        }
        let rank = version_rank(m, authors);
        match fork {
            Some((ours, theirs)) => (theirs, m.round, rank) > (ours, self.round, self.rank),
            None => m.round > self.round || (m.round == self.round && rank > self.rank),
        }
    }

    /// The door's current norm limit (for checking the deltas a peer's
    /// version names).
    pub fn door(&self) -> &Door {
        &self.door
    }

    /// The shell has stored admitted delta `id` (this node's own, or a
    /// peer's) and offers to read it from there: the engine drops the
    /// payload it held and aggregates the delta from `source`, a block at
    /// a time, when its round closes. Only for fixed-width codecs (`f32`,
    /// `bf16`); a compressed payload is small and stays in memory.
    pub fn payload_stored(
        &mut self,
        id: ContentId,
        source: std::sync::Arc<dyn PayloadSource + Send + Sync>,
    ) {
        let n = self.door.n_values();
        if let Some(r) = self.received.get_mut(&id)
            && r.values.is_some()
            && let codec = r.manifest.message().codec
            && fixed_width(codec).is_some()
        {
            r.values = Some(Held::Stored {
                codec,
                source,
                len: n,
            });
        }
    }

    /// Drops the values of the deltas the head's lineage aggregated (they
    /// are never aggregated again, and the shell's store keeps their
    /// payloads): a node holds the decoded values of the deltas still to
    /// aggregate, not of the whole staleness window. A delta whose values
    /// went and that the head no longer counts as used (the node moved to
    /// a version that did not aggregate it) is fetched again (from the
    /// shell's store) and decoded without a second judgement at the door.
    fn release_used(&mut self, out: &mut Vec<Action>) {
        let mut reload = Vec::new();
        for r in self.received.values_mut() {
            if self.used.contains_key(&r.id) {
                r.values = None;
            } else if r.values.is_none() {
                reload.push(r.id);
            }
        }
        for id in reload {
            if let Some(r) = self.received.remove(&id) {
                self.readmit.insert(id);
                self.pending.insert(id, r.manifest.clone());
                out.push(Action::Fetch {
                    manifest: r.manifest,
                });
            }
        }
    }

    fn start_round(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        self.round_started_ms = now_ms;
        self.training = true;
        // Forget what is too old to be used any more.
        let oldest = self.round.saturating_sub(self.config.door.staleness);
        self.received.retain(|_, r| r.round >= oldest);
        self.pending.retain(|_, m| m.message().round >= oldest);
        self.readmit.retain(|id| self.pending.contains_key(id));
        self.votes.retain(|(r, _), _| *r >= oldest);
        self.last_seq.retain(|_, (_, r)| *r >= oldest);
        // A delta used by a version of round s was of round s − 1 or
        // earlier: once s is this far back, the door refuses it anyway.
        let forget = oldest.saturating_sub(2);
        self.used.retain(|_, s| *s >= forget);
        self.release_used(out);
        let round = self.round;
        self.neighbour_models.retain(|(r, _), _| *r >= round);
        self.trained = None;
        if self.awaiting_foreign_heads(now_ms, out) {
            return;
        }
        if self.votes.contains_key(&(self.round, self.node_id())) {
            // This node already voted in this round (it moved to a
            // preferred version of the round after publishing): its delta
            // stands, one vote per author per round, so no second one.
            self.training = false;
            self.timer_ms = now_ms + self.config.round_timeout_ms;
            out.push(Action::SetTimer {
                at_ms: self.timer_ms,
            });
            return;
        }
        self.training_from = Some(self.version.unwrap_or_else(|| ContentId::of(b"")));
        out.push(Action::Train {
            round: self.round,
            version: self.version.unwrap_or_else(|| ContentId::of(b"")),
            params: self.params.to_vec(),
            seed: self.rng.r#gen(),
        });
        self.timer_ms = now_ms + self.config.round_timeout_ms;
        out.push(Action::SetTimer {
            at_ms: self.timer_ms,
        });
    }

    /// Whether this node now waits for foreign heads instead of training:
    /// its head is its region's plain version of a mix round, and it has
    /// not waited for this version yet (sets the wait and its timer).
    fn awaiting_foreign_heads(&mut self, now_ms: u64, out: &mut Vec<Action>) -> bool {
        let Some(version) = self.version else {
            return false;
        };
        let mixes = self.config.mode == Mode::Broadcast
            && self.parents.len() == 1
            && self
                .config
                .federation
                .as_ref()
                .is_some_and(|f| f.is_mix_round(self.round));
        if !mixes {
            self.wait = None;
            return false;
        }
        if self.wait.is_some_and(|(v, _)| v == version) {
            // Waited already: the time is up.
            return false;
        }
        let wait_ms = self.config.federation.as_ref().map_or(0, |f| f.wait_ms);
        self.wait = Some((version, now_ms + wait_ms));
        self.training = false;
        self.timer_ms = now_ms + wait_ms;
        out.push(Action::SetTimer {
            at_ms: self.timer_ms,
        });
        true
    }

    /// Mixes the head with the foreign heads offered, if the head is this
    /// region's plain version of a mix round: the heads that fit (this
    /// model, a neighbouring region, the head's round, finite parameters of
    /// the model's size; one per region, the smallest id) become parents of
    /// a version of the same round with the mixed parameters.
    fn on_foreign_heads(
        &mut self,
        heads: Vec<(Verified<ModelManifest>, std::sync::Arc<Vec<f32>>)>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(fed) = self.config.federation.clone() else {
            return;
        };
        let Some(own) = self.version else {
            return;
        };
        if !fed.is_mix_round(self.round) || self.parents.len() != 1 {
            return;
        }
        let mut taken: BTreeMap<String, (Verified<ModelManifest>, std::sync::Arc<Vec<f32>>)> =
            BTreeMap::new();
        for (m, params) in heads {
            let fits = m.message().model_id == self.config.model_id
                && m.message().round == self.round
                && fed
                    .weight(&self.config.region, &m.message().region)
                    .is_some()
                && self.fits(&params);
            let region = m.message().region.clone();
            if fits && taken.get(&region).is_none_or(|(t, _)| m.id() < t.id()) {
                taken.insert(region, (m, params));
            }
        }
        if taken.is_empty() {
            return;
        }
        let foreign: Vec<crate::federation::ForeignHead<'_>> = taken
            .values()
            .map(|(m, p)| crate::federation::ForeignHead {
                id: m.id(),
                region: &m.message().region,
                params: p,
            })
            .collect();
        let Ok(params) = crate::federation::mix(&fed, &self.config.region, &self.params, &foreign)
        else {
            return;
        };
        let mut parents: Vec<ContentId> = taken.values().map(|(m, _)| m.id()).collect();
        parents.push(own);
        parents.sort();
        self.params = std::sync::Arc::new(params);
        // A mix has no single previous step: the next one takes none.
        self.previous = None;
        self.wait = None;
        self.sign_version(self.round, parents, Vec::new(), now_ms, out);
    }

    /// Past the deadline with nothing to close on: wake again one timeout
    /// later, unless a wake-up is already pending (so inputs arriving while
    /// a node waits do not pile up timers).
    fn rearm(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        if self.timer_ms <= now_ms {
            self.timer_ms = now_ms + self.config.round_timeout_ms;
            out.push(Action::SetTimer {
                at_ms: self.timer_ms,
            });
        }
    }

    fn publish(&mut self, trained: Vec<f32>, samples: u64, out: &mut Vec<Action>) {
        let lap = self.lap();
        // What peers will decode is what this node aggregates too: for f32
        // the delta itself, computed in place in the trained parameters
        // and shared with the shell as the payload (no copy); for a lossy
        // codec its decoded values, and the payload beside them.
        let (payload, values, norm) = if self.config.codec == Codec::F32 {
            let Some(delta) = f32_delta_in_place(&self.params, trained) else {
                // Training diverged (non-finite): skip this round's
                // contribution.
                return;
            };
            let norm = l2_norm(delta.iter().copied());
            let delta = std::sync::Arc::new(delta);
            (Payload::F32(delta.clone()), Held::Decoded(delta), norm)
        } else {
            let delta: Vec<f32> = self
                .params
                .iter()
                .zip(&trained)
                .map(|(a, b)| a - b)
                .collect();
            drop(trained);
            let Ok(payload) = self.feedback.encode(&self.config.codec, &delta) else {
                return;
            };
            let sent = if self.config.codec.is_lossless() {
                delta
            } else {
                let Ok(sent) = self.config.codec.decode(&payload, delta.len()) else {
                    return;
                };
                sent
            };
            let norm = l2_norm(sent.iter().copied());
            let payload = std::sync::Arc::new(payload);
            // The payload is the smaller copy: keep it, not the decoded one.
            let values = Held::keep(self.config.codec, payload.clone(), sent);
            (Payload::Bytes(payload), values, norm)
        };
        let lap = self.charge(lap, |t| &mut t.encode);
        let chunk_ids = payload
            .bytes()
            .chunks(self.config.chunk_size)
            .map(ContentId::of)
            .collect();
        let lap = self.charge(lap, |t| &mut t.hash);
        self.seq += 1;
        let manifest = DeltaManifest {
            model_id: self.config.model_id.clone(),
            region: self.config.region.clone(),
            round: self.round,
            base_version: self.version.unwrap_or_else(|| ContentId::of(b"")),
            author: self.node_id(),
            seq: self.seq,
            codec: self.config.codec,
            layout: self.config.spec.layout(),
            payload_bytes: payload.len() as u64,
            chunk_size: self.config.chunk_size as u32,
            chunk_ids,
            sample_count: samples.max(1),
            l2_norm: norm,
            created_unix_ms: self.wall_ms(),
        };
        let Ok(signed) = Signed::sign(manifest, &self.key) else {
            return;
        };
        self.charge(lap, |t| &mut t.sign);
        self.votes.insert((self.round, self.node_id()), signed.id());
        self.received.insert(
            signed.id(),
            Received {
                id: signed.id(),
                round: self.round,
                author: self.node_id(),
                sample_count: samples.max(1),
                values: Some(values),
                manifest: signed.clone(),
            },
        );
        out.push(Action::Publish {
            manifest: signed,
            payload,
        });
    }

    fn on_announced(&mut self, m: Verified<DeltaManifest>, out: &mut Vec<Action>) {
        let msg = m.message();
        if msg.author == self.node_id()
            || self.received.contains_key(&m.id())
            || self.used.contains_key(&m.id())
        {
            return;
        }
        // Replay: a sequence number not above the last one seen from this author.
        if let Some(&(last, _)) = self.last_seq.get(&msg.author).filter(|s| msg.seq <= s.0) {
            out.push(Action::Penalise(Rejected {
                sender: msg.author,
                reason: crate::door::Rejection::Replay { seq: msg.seq, last },
            }));
            return;
        }
        // A fresh signed delta of this region, even of a round the door
        // refuses (a node behind hears its peers' later rounds): its author
        // takes part.
        if self.peers.contains(&msg.author)
            && msg.model_id == self.config.model_id
            && msg.region == self.config.region
        {
            self.heard.insert(msg.author, self.now_ms);
        }
        if let Err(r) = self.door.check_manifest(msg, self.round) {
            out.push(Action::Penalise(r));
            return;
        }
        // One author, one vote per round: a second delta for a round is
        // refused, whatever its sequence number.
        if self
            .votes
            .get(&(msg.round, msg.author))
            .is_some_and(|d| *d != m.id())
        {
            out.push(Action::Penalise(Rejected {
                sender: msg.author,
                reason: crate::door::Rejection::DuplicateAuthorRound { round: msg.round },
            }));
            return;
        }
        self.votes.insert((msg.round, msg.author), m.id());
        self.last_seq.insert(msg.author, (msg.seq, msg.round));
        self.peers.insert(msg.author);
        self.heard.insert(msg.author, self.now_ms);
        self.pending.insert(m.id(), m.clone());
        out.push(Action::Fetch { manifest: m });
    }

    fn maybe_close(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        if self.version.is_none() {
            return;
        }
        if let Some((v, until)) = self.wait
            && self.version == Some(v)
            && self.training_from != Some(v)
            && !self.votes.contains_key(&(self.round, self.node_id()))
        {
            // Waiting for foreign heads: nothing of this round to close.
            if now_ms >= until {
                self.start_round(now_ms, out);
            } else {
                self.rearm(now_ms, out);
            }
            return;
        }
        let deadline = now_ms >= self.round_started_ms + self.config.round_timeout_ms;
        // Wait for our own contribution unless the round is overdue.
        if self.training && !deadline {
            return;
        }
        if let Mode::PushSum { .. } = self.config.mode {
            // Push-sum rounds close right after pushing; nothing to wait for.
            return;
        }
        if self.config.mode == Mode::Mixing {
            // A neighbour ahead of us (after a partition or a restart) has
            // already sent a later round's model: use it rather than wait.
            let heard = self.latest_neighbour_models().len();
            if self.trained.is_some() && (heard >= self.peers.len() || deadline) {
                self.close_mixing_round(now_ms, out);
            } else if deadline {
                self.rearm(now_ms, out);
            }
            return;
        }
        // Distinct authors (one delta per author and round is admitted).
        let this_round = self
            .received
            .values()
            .filter(|r| r.round == self.round && !self.used.contains_key(&r.id))
            .map(|r| r.author)
            .collect::<BTreeSet<_>>()
            .len();
        let taking_part = self
            .peers
            .iter()
            .filter(|p| self.takes_part(p, now_ms))
            .count();
        let needed = (((taking_part + 1) as f64 * self.config.quorum).ceil() as usize).max(1);
        if this_round >= needed || (deadline && this_round > 0) {
            self.close_round(now_ms, out);
        } else if deadline {
            // Nothing arrived for this round yet: look again later.
            self.rearm(now_ms, out);
        }
    }

    fn close_round(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let oldest = self.round.saturating_sub(self.config.door.staleness);
        let inputs: Vec<(&Received, Values<'_>)> = self
            .received
            .values()
            .filter(|r| {
                r.round >= oldest && r.round <= self.round && !self.used.contains_key(&r.id)
            })
            .filter_map(|r| Some((r, r.values.as_ref()?.values())))
            .collect();
        // The one computation every verifier repeats (verify::aggregate_onto).
        let deltas: Vec<DeltaInput<'_>> = inputs
            .iter()
            .map(|(r, values)| DeltaInput {
                id: r.id,
                sample_count: r.sample_count,
                values: *values,
            })
            .collect();
        // With momentum, the step the head's own step continues; not known
        // here (a head adopted without its parent's parameters): leave the
        // round to a peer's version.
        let previous = match self.parents.as_slice() {
            [_] if self.config.outer.has_momentum() => match &self.previous {
                Some(p) => Some(p.clone()),
                None => {
                    self.rearm(now_ms, out);
                    return;
                }
            },
            _ => None,
        };
        let lap = self.lap();
        let aggregated = aggregate_onto_owned(
            &self.config,
            self.params.to_vec(),
            previous.as_deref().map(Vec::as_slice),
            &deltas,
        );
        let done = self.lap();
        let params = match aggregated {
            Ok(params) => params,
            Err(AggregateError::Read { index, .. }) => {
                // The shell's store could not give back a delta it kept
                // (inputs are aggregated in the order of their ids): hold
                // it in memory again, from the store or its providers, and
                // close when it is back.
                let mut ids: Vec<ContentId> = deltas.iter().map(|d| d.id).collect();
                ids.sort();
                if let Some(id) = ids.get(index).copied()
                    && let Some(r) = self.received.remove(&id)
                {
                    self.readmit.insert(id);
                    self.pending.insert(id, r.manifest.clone());
                    out.push(Action::Fetch {
                        manifest: r.manifest,
                    });
                }
                return;
            }
            Err(_) => return,
        };
        let authors = inputs
            .iter()
            .map(|(r, _)| r.author)
            .collect::<BTreeSet<_>>()
            .len();
        let delta_ids: Vec<ContentId> = inputs.iter().map(|(r, _)| r.id).collect();
        if let (Some(lap), Some(done)) = (lap, done) {
            self.stages.aggregate += done.saturating_duration_since(lap);
        }
        let before = std::mem::replace(&mut self.params, std::sync::Arc::new(params));
        let next = self.round.saturating_add(1);
        for id in &delta_ids {
            self.used.insert(*id, next);
        }
        self.new_version(delta_ids, now_ms, out);
        self.previous = self.config.outer.has_momentum().then_some(before);
        self.rank = VersionRank {
            authors,
            ..self.rank
        };
    }
}

/// The delta `params − trained`, computed in place in `trained` (no
/// second vector), or `None` if a value is not finite.
fn f32_delta_in_place(params: &[f32], mut trained: Vec<f32>) -> Option<Vec<f32>> {
    for (t, p) in trained.iter_mut().zip(params) {
        *t = p - *t;
        if !t.is_finite() {
            return None;
        }
    }
    Some(trained)
}

/// The L2 norm of `values`, their squares summed in f64 in order.
fn l2_norm(values: impl Iterator<Item = f32>) -> f32 {
    values.map(|v| f64::from(v).powi(2)).sum::<f64>().sqrt() as f32
}

#[cfg(test)]
mod publish_tests {
    use super::*;

    #[test]
    fn an_f32_delta_in_place_is_the_encoded_delta_and_refuses_what_is_not_finite() {
        let params: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let trained: Vec<f32> = params.iter().map(|p| p * 0.9 + 0.001).collect();
        let delta: Vec<f32> = params.iter().zip(&trained).map(|(a, b)| a - b).collect();
        let in_place = f32_delta_in_place(&params, trained.clone()).unwrap();
        let payload = Payload::F32(std::sync::Arc::new(in_place));
        assert_eq!(
            &payload.bytes()[..],
            &Codec::F32.encode(&delta).unwrap()[..]
        );
        assert_eq!(payload.len(), 4000);
        let mut diverged = trained;
        diverged[500] = f32::INFINITY;
        assert!(f32_delta_in_place(&params, diverged).is_none());
    }
}
