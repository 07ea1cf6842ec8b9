//! The running node: the round engine driven by real time, real peers and a
//! real chunk store. One task owns the [`Engine`]; training and evaluation
//! run on blocking threads, chunk fetches on their own tasks, and their
//! results come back as engine inputs. The network task ([`crate::net`])
//! owns the swarm.
//!
//! What a message must pass before the engine sees it: the signed envelope
//! verifies and names the right kind, the message validates on its own terms
//! (author = signer, sizes), the roster admits the author (permissioned
//! regions), and then the engine's door (scope, layout, round window,
//! replay). Gossipsub forwards only what passed; everything else is
//! reported as `Reject`, which costs the forwarder score, and is counted in
//! the metrics by reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::gossipsub::{MessageAcceptance, TopicHash};
use serde::Serialize;
use tapestry_protocol::{
    ContentId, DeltaManifest, FetchRequest, FetchResponse, Keypair, ModelManifest, NodeId, Roster,
    Signed, Verified,
};
use tapestry_storage::ChunkStore;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::net::{self, Command, NetEvent, NetHandle};
use tapestry_core::data::Dataset;
use tapestry_core::door::Door;
use tapestry_core::engine::{Action, Engine, EngineConfig, Input, VersionRank, genesis};
use tapestry_core::model::{InnerState, TrainConfig, evaluate, train_local};
use tapestry_core::verify::{self, Lineage, Plan, VersionRejection, check_shape};
use tapestry_core::{attest, heads};

/// The store a node keeps everything in.
pub type Store = Arc<dyn ChunkStore + Send + Sync>;

/// The ref naming a node's head model version.
pub const HEAD_REF: &str = "head";

/// The ref marking a model version this node verified (made, recomputed,
/// or derived: the genesis). Only verified versions are parents to build
/// on, served as lineage, or compared as branches.
pub fn verified_ref(id: &ContentId) -> String {
    format!("verified/{id}")
}

/// The ref marking a version this node took on roster members'
/// attestations ([`tapestry_core::attest`]) rather than recomputed: it builds
/// on it, but does not attest it to others.
pub fn attested_ref(id: &ContentId) -> String {
    format!("attested/{id}")
}

/// Whether `store` marks version `id` verified.
fn is_verified(store: &Store, id: &ContentId) -> bool {
    matches!(store.get_ref(&verified_ref(id)), Ok(Some(v)) if v == *id)
}

/// Gossip topic of a region's delta announcements.
pub fn deltas_topic(model_id: &str, region: &str) -> String {
    format!("/tapestry/1/{model_id}/{region}/deltas")
}

/// Gossip topic of a region's model versions.
pub fn models_topic(model_id: &str, region: &str) -> String {
    format!("/tapestry/1/{model_id}/{region}/models")
}

/// The node id behind a peer id (both are the same ed25519 key).
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let key = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    Some(NodeId::from_bytes(ed.to_bytes()))
}

/// The key that signs a region's initial model version. Every node derives
/// the same one from the model and region names, so every node starts from
/// the same, verifiable genesis without anyone distributing it.
pub fn genesis_key(model_id: &str, region: &str) -> Keypair {
    let seed = blake3::derive_key(
        "tapestry genesis key v1",
        format!("{model_id}\0{region}").as_bytes(),
    );
    Keypair::from_secret_bytes(&seed)
}

/// What a node trains on and is judged by.
#[derive(Debug, Clone)]
pub struct LocalData {
    /// Its private training rows (already scaled).
    pub train: Dataset,
    /// Its held-out rows for evaluation.
    pub test: Dataset,
}

/// Everything a running node needs besides its key, store and network.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The round engine's settings (model, region, rule, timing...).
    pub engine: EngineConfig,
    /// Local training.
    pub train: TrainConfig,
    /// Seed of the initial parameters (the same on every node of a region).
    pub model_seed: u64,
    /// Stop starting new rounds after this one (`None`: run forever).
    pub rounds: Option<u64>,
    /// Wait for this many peers before the first round (at most
    /// `start_wait`), so the first rounds are not trained alone.
    pub start_peers: usize,
    /// Longest wait for `start_peers`.
    pub start_wait: Duration,
    /// Shortest time from one round's start to the next's: training waits
    /// out the rest (zero: rounds run back to back).
    pub min_round: Duration,
    /// A permissioned region's roster; `None` for an open region.
    pub roster: Option<Verified<Roster>>,
    /// Who may sign the roster (the region key); required with a roster.
    pub region_key: Option<NodeId>,
    /// Where the node keeps its last announced delta (signed manifest), so
    /// that after a crash it does not vote twice in one round; `None`:
    /// nowhere (a restarted node may then announce a second delta for a
    /// round, which its peers refuse).
    pub vote_file: Option<std::path::PathBuf>,
    /// In a permissioned region, how many distinct roster members must
    /// vouch for a version this node cannot recompute before it adopts it
    /// (0: more than a third of the roster; never fewer than two).
    pub attestations: usize,
}

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

    fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

/// Why a node stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] tapestry_storage::StoreError),
    /// The network failed.
    #[error("network: {0}")]
    Net(#[from] net::NetError),
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
}

/// The node's own task.
pub struct Node {
    settings: NodeSettings,
    engine: Engine,
    store: Store,
    net: NetHandle,
    data: Arc<LocalData>,
    shared: Shared,
    started: Instant,
    timers: BTreeSet<u64>,
    inputs_tx: mpsc::Sender<Input>,
    inputs_rx: mpsc::Receiver<Input>,
    /// Connected peers.
    peers: BTreeSet<PeerId>,
    /// Connected peers subscribed to this region's deltas: the region's
    /// members as far as this node can see (peers of other regions share
    /// the network, not the rounds).
    members: BTreeSet<PeerId>,
    /// Who forwarded each announced delta (where to fetch its chunks).
    providers: HashMap<ContentId, Vec<PeerId>>,
    deltas_topic: String,
    models_topic: String,
    deltas_hash: TopicHash,
    models_hash: TopicHash,
    running: bool,
    /// The preferred verified version announced for each coming round, and
    /// who announced it.
    best_seen: BTreeMap<u64, (VersionRank, Verified<ModelManifest>, PeerId)>,
    /// Verdicts of version verifications, back from their tasks.
    verdicts_tx: mpsc::Sender<Verdict>,
    verdicts_rx: mpsc::Receiver<Verdict>,
    /// What this node announces in the DHT, oldest first.
    provided: std::collections::VecDeque<ContentId>,
    /// Versions being fetched to be offered to the engine (a fetch that
    /// fails takes its version out again, so it can be tried again).
    offered: Arc<Mutex<std::collections::HashSet<ContentId>>>,
    /// Peers' versions of the round after this node's, held unverified
    /// until this node closes its own round (then most are the same
    /// computation as its own and are checked by comparison, not
    /// recomputed), or until a round's timeout has passed.
    early: Vec<(
        Verified<ModelManifest>,
        PeerId,
        Option<libp2p::gossipsub::MessageId>,
        Instant,
    )>,
    /// Versions this node made or verified lately: a peer's version with
    /// the same inputs ([`verify::same_computation`]) is checked against them
    /// instead of being recomputed.
    recent: Recent,
    /// Heads peers answered with, as signed bytes, and who answered.
    heads_tx: mpsc::Sender<(PeerId, Vec<u8>)>,
    heads_rx: mpsc::Receiver<(PeerId, Vec<u8>)>,
    /// Which peers to ask for their heads next (they take turns).
    head_probe: usize,
    /// When the last training started (or will, when paced).
    last_train: Option<Instant>,
    /// This node's identity (signs its attestations).
    key: Keypair,
}

impl Node {
    /// A node over a started network.
    pub fn new(
        settings: NodeSettings,
        key: Keypair,
        store: Store,
        net: NetHandle,
        data: LocalData,
        shared: Shared,
    ) -> Result<Node, NodeError> {
        let mut settings = settings;
        if let Some(roster) = &settings.roster {
            check_roster(roster, &settings)?;
            // In a permissioned region a branch must be more than a third
            // of the roster to be merged (a partition's smaller side still
            // is, one member or a small clique on its own is not).
            let third = roster.message().members.len() / 3 + 1;
            let door = &mut settings.engine.door;
            door.min_branch_authors = door.min_branch_authors.max(third);
        }
        let cfg = &settings.engine;
        let deltas_topic = deltas_topic(&cfg.model_id, &cfg.region);
        let models_topic = models_topic(&cfg.model_id, &cfg.region);
        let (inputs_tx, inputs_rx) = mpsc::channel(256);
        let (heads_tx, heads_rx) = mpsc::channel(64);
        let (verdicts_tx, verdicts_rx) = mpsc::channel(64);
        shared.update(|s| {
            s.node_id = key.node_id().to_string();
            s.peer_id = net.peer_id().to_string();
            s.model_id = cfg.model_id.clone();
            s.region = cfg.region.clone();
        });
        let mut engine = Engine::new(settings.engine.clone(), key.clone());
        engine.continue_sequence_after(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        );
        Ok(Node {
            engine,
            deltas_hash: libp2p::gossipsub::IdentTopic::new(&deltas_topic).hash(),
            models_hash: libp2p::gossipsub::IdentTopic::new(&models_topic).hash(),
            deltas_topic,
            models_topic,
            settings,
            store,
            net,
            data: Arc::new(data),
            shared,
            started: Instant::now(),
            timers: BTreeSet::new(),
            inputs_tx,
            inputs_rx,
            peers: BTreeSet::new(),
            members: BTreeSet::new(),
            providers: HashMap::new(),
            running: false,
            best_seen: BTreeMap::new(),
            verdicts_tx,
            verdicts_rx,
            provided: std::collections::VecDeque::new(),
            offered: Arc::default(),
            recent: Recent::default(),
            early: Vec::new(),
            heads_tx,
            heads_rx,
            head_probe: 0,
            last_train: None,
            key,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The version to start from: the stored head if there is one (a
    /// restart resumes where it was), else the region's genesis.
    fn starting_version(&self) -> Result<(Verified<ModelManifest>, Vec<f32>), NodeError> {
        if let Some(id) = self.store.get_ref(HEAD_REF)?
            && let Some(m) = self.store.get_model_manifest(&id)?
        {
            let bytes = self
                .store
                .read_payload(&m.message().chunk_ids, m.message().payload_bytes)?;
            let params = floats(&bytes);
            if params.len() == self.settings.engine.spec.n_params() {
                // This node's own head (made, verified or imported here).
                self.store.set_ref(&verified_ref(&id), id)?;
                return Ok((m, params));
            }
        }
        let cfg = &self.settings.engine;
        let params = cfg.spec.init(self.settings.model_seed);
        let manifest = genesis(cfg, &params, &genesis_key(&cfg.model_id, &cfg.region))
            .ok_or_else(|| NodeError::Config("cannot sign the genesis version".into()))?;
        self.keep_version(&manifest, &params)?;
        Ok((manifest, params))
    }

    /// This node's own delta of round `round`, if it announced one before a
    /// restart (read from [`NodeSettings::vote_file`]; a file that does not
    /// open as this node's signed delta is ignored, with a warning).
    fn last_vote(&self, round: u64) -> Option<Verified<DeltaManifest>> {
        let path = self.settings.vote_file.as_ref()?;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot read last vote");
                return None;
            }
        };
        match Signed::<DeltaManifest>::open(&bytes) {
            Ok(m) if m.message().author == self.engine.node_id() => {
                (m.message().round == round).then_some(m)
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "last vote is not this node's; ignored");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "last vote unreadable; ignored");
                None
            }
        }
    }

    fn keep_version(&self, m: &Verified<ModelManifest>, params: &[f32]) -> Result<(), NodeError> {
        self.recent.add(m.message(), m.id());
        let bytes: Vec<u8> = tapestry_protocol::f32_le_bytes(params);
        self.store
            .put_payload(&bytes, m.message().chunk_size as usize)?;
        let id = self.store.put_model_manifest(m)?;
        self.store.set_ref(&verified_ref(&id), id)?;
        self.store.set_ref(HEAD_REF, id)?;
        self.store.flush()?;
        Ok(())
    }

    /// Runs until `shutdown` turns true or the network stops; flushes the
    /// store on the way out.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<NetEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NodeError> {
        let (start_manifest, start_params) = self.starting_version()?;
        self.show_head(&start_manifest, &start_params);
        let start_at = Instant::now() + self.settings.start_wait;
        let mut ticker = tokio::time::interval(Duration::from_secs(2));
        let mut start = Some((start_manifest, start_params));
        loop {
            if start.is_some()
                && (self.members.len() >= self.settings.start_peers || Instant::now() >= start_at)
                && let Some((manifest, params)) = start.take()
            {
                self.running = true;
                tracing::info!(
                    round = manifest.message().round,
                    peers = self.members.len(),
                    "starting rounds"
                );
                if let Some(vote) = self.last_vote(manifest.message().round) {
                    // Restarted mid-round after voting: that delta stands.
                    let members: Vec<PeerId> = self.members.iter().copied().collect();
                    self.providers.insert(vote.id(), members);
                    tracing::info!(round = vote.message().round, id = %vote.id().short(), "resuming with own delta of this round");
                    self.feed(Input::OwnVote(vote)).await;
                }
                self.feed(Input::Start { manifest, params }).await;
                // A fresh or restarted node asks its peers where they are.
                self.ask_heads(self.members.iter().copied().collect());
            }
            let next = self.timers.first().copied();
            let sleep = match next {
                Some(at) => {
                    let now = self.now_ms();
                    Duration::from_millis(at.saturating_sub(now))
                }
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                event = events.recv() => match event {
                    Some(event) => self.on_net(event).await,
                    None => break,
                },
                Some(input) = self.inputs_rx.recv() => self.feed(input).await,
                _ = tokio::time::sleep(sleep), if next.is_some() => {
                    let now = self.now_ms();
                    while self.timers.first().is_some_and(|t| *t <= now) {
                        self.timers.pop_first();
                    }
                    self.feed(Input::Tick).await;
                }
                Some((peer, bytes)) = self.heads_rx.recv() => {
                    self.on_model(peer, &bytes, None).await;
                }
                Some(verdict) = self.verdicts_rx.recv() => self.on_verdict(verdict).await,
                _ = ticker.tick() => {
                    self.refresh_network().await;
                    self.verify_early(false).await;
                    // Announcements can be missed (a peer that was away, a
                    // message lost); every tick two peers take turns to say
                    // where they are, so a node that missed a preferred
                    // version still settles on it.
                    if self.running && !self.members.is_empty() {
                        let peers: Vec<PeerId> = self.members.iter().copied().collect();
                        let ask = (0..2.min(peers.len()))
                            .map(|k| peers[(self.head_probe + k) % peers.len()])
                            .collect();
                        self.head_probe = self.head_probe.wrapping_add(2);
                        self.ask_heads(ask);
                    }
                }
            }
        }
        self.store.flush()?;
        tracing::info!("node stopped; store flushed");
        Ok(())
    }

    async fn refresh_network(&self) {
        if let Ok(snap) = self.net.snapshot().await {
            self.shared.update(|s| {
                s.peers = snap.peers.len();
                s.listen = snap.listen.clone();
            });
            self.shared.metrics.peers.set(snap.peers.len() as i64);
        }
    }

    /// Feeds one input to the engine and carries out what it asks.
    async fn feed(&mut self, input: Input) {
        let now = self.now_ms();
        let actions = self.engine.handle(input, now);
        for action in actions {
            self.act(action).await;
        }
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::Train {
                round,
                version,
                params,
                seed,
            } => {
                if self.settings.rounds.is_some_and(|r| round >= r) {
                    self.shared.update(|s| s.finished = true);
                    return;
                }
                let (spec, cfg, data) = (
                    self.settings.engine.spec.clone(),
                    self.settings.train,
                    self.data.clone(),
                );
                let tx = self.inputs_tx.clone();
                // Pacing: a round starts at most every `min_round`.
                let now = Instant::now();
                let wait = self.last_train.map_or(Duration::ZERO, |t| {
                    (t + self.settings.min_round).saturating_duration_since(now)
                });
                self.last_train = Some(now + wait);
                tokio::spawn(async move {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let trained = tokio::task::spawn_blocking(move || {
                        train_local(
                            &spec,
                            &params,
                            &data.train,
                            &cfg,
                            &mut InnerState::default(),
                            seed,
                        )
                    })
                    .await;
                    match trained {
                        Ok(Ok((params, report))) => {
                            let _ = tx
                                .send(Input::TrainingDone {
                                    round,
                                    version,
                                    params,
                                    samples: report.samples,
                                })
                                .await;
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "local training failed"),
                        Err(e) => tracing::error!(error = %e, "training task failed"),
                    }
                });
            }
            Action::Publish { manifest, payload } => {
                let m = manifest.message();
                let stored = self
                    .store
                    .put_payload(&payload, m.chunk_size as usize)
                    .and_then(|_| self.store.put_delta_manifest(&manifest));
                if let Err(e) = stored {
                    tracing::error!(error = %e, "cannot store own delta; not announcing it");
                    return;
                }
                let data = manifest.envelope_bytes().to_vec();
                if let Some(path) = &self.settings.vote_file
                    && let Err(e) = write_atomically(path, &data)
                {
                    tracing::error!(error = %e, path = %path.display(), "cannot record own vote; not announcing it");
                    return;
                }
                self.count_out(data.len());
                self.provide(manifest.id()).await;
                if let Err(e) = self.net.publish(&self.deltas_topic, data).await {
                    tracing::warn!(error = %e, "cannot announce delta");
                }
                tracing::debug!(round = m.round, id = %manifest.id().short(), "delta announced");
            }
            Action::Fetch { manifest } => {
                let mut providers = self
                    .providers
                    .get(&manifest.id())
                    .cloned()
                    .unwrap_or_default();
                if let Some(author) = net::peer_id_of(&manifest.message().author)
                    && !providers.contains(&author)
                {
                    providers.push(author);
                }
                let (net, store, tx, shared) = (
                    self.net.clone(),
                    self.store.clone(),
                    self.inputs_tx.clone(),
                    self.shared.clone(),
                );
                tokio::spawn(async move {
                    if let Some(payload) =
                        fetch_payload(&net, &store, &manifest, &providers, &shared).await
                    {
                        let _ = tx
                            .send(Input::DeltaPayload {
                                id: manifest.id(),
                                payload,
                            })
                            .await;
                    }
                });
            }
            Action::Adopt { manifest, params } => {
                if let Err(e) = self.keep_version(&manifest, &params) {
                    tracing::error!(error = %e, "cannot store the new version");
                }
                // A peer may already have announced a preferred version of
                // this round while this node was still closing it.
                let round = manifest.message().round;
                self.best_seen.retain(|r, _| *r >= round);
                if let Some((_, best, source)) = self.best_seen.remove(&round) {
                    self.offer_if_preferred(best, source, None);
                }
                self.shared.metrics.rounds.inc();
                self.verify_early(true).await;
                self.show_head(&manifest, &params);
                let data = manifest.envelope_bytes().to_vec();
                self.count_out(data.len());
                self.provide(manifest.id()).await;
                let _ = self.net.publish(&self.models_topic, data).await;
                if self.providers.len() > 4096 {
                    self.providers.clear();
                }
            }
            Action::SendToNeighbours { .. } | Action::PushShare { .. } => {
                // The networked node runs region broadcast (see the config).
            }
            Action::SetTimer { at_ms } => {
                self.timers.insert(at_ms);
            }
            Action::Penalise(r) => {
                let label = r.reason.label();
                tracing::info!(sender = %r.sender.short(), reason = %r.reason, "delta rejected");
                self.count_rejected(label);
            }
        }
    }

    /// Evaluates a head on the local split and publishes it in the status.
    fn show_head(&self, manifest: &Verified<ModelManifest>, params: &[f32]) {
        let (loss, accuracy) = evaluate(&self.settings.engine.spec, params, &self.data.test)
            .map(|(l, a)| (Some(l), Some(a)))
            .unwrap_or((None, None));
        let m = manifest.message();
        let params_id = ContentId::of(
            &m.chunk_ids
                .iter()
                .flat_map(|c| *c.as_bytes())
                .collect::<Vec<u8>>(),
        );
        let norm_limit = self.engine.door().norm_limit();
        self.shared.update(|s| {
            s.norm_limit = norm_limit;
            s.round = m.round;
            s.head = Some(manifest.id().to_string());
            s.head_params = Some(params_id.to_string());
            s.accuracy = accuracy;
            s.loss = loss;
        });
        if let Some(a) = accuracy {
            self.shared.metrics.set_accuracy(a);
        }
        self.shared.metrics.round.set(m.round as i64);
        self.shared.metrics.set_head(&params_id.to_string());
        if let Ok(mut h) = self.shared.head.lock() {
            *h = Some(manifest.clone());
        }
        tracing::info!(round = m.round, accuracy = ?accuracy, head = %manifest.id().short(), "head");
    }

    /// Announces in the DHT that this node serves `id`, and withdraws the
    /// oldest such record beyond [`MAX_PROVIDED`].
    async fn provide(&mut self, id: ContentId) {
        let _ = self.net.send(Command::Provide(id)).await;
        self.provided.push_back(id);
        while self.provided.len() > MAX_PROVIDED {
            if let Some(old) = self.provided.pop_front() {
                let _ = self.net.send(Command::Unprovide(old)).await;
            }
        }
    }

    fn count_out(&self, n: usize) {
        self.shared.metrics.bytes_out.inc_by(n as u64);
        self.shared.update(|s| s.bytes_out += n as u64);
    }

    fn count_rejected(&self, reason: &str) {
        self.shared.metrics.reject(reason);
        self.shared
            .update(|s| *s.rejected.entry(reason.to_owned()).or_default() += 1);
    }

    async fn report(
        &self,
        id: libp2p::gossipsub::MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    ) {
        let _ = self
            .net
            .send(Command::Report {
                id,
                source,
                acceptance,
            })
            .await;
    }

    /// Whether the roster (if any) admits `author`.
    fn admitted(&self, author: &NodeId) -> bool {
        match &self.settings.roster {
            None => true,
            Some(r) => r.message().members.binary_search(author).is_ok(),
        }
    }

    async fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Listening(addr) => {
                tracing::info!(%addr, "listening");
                self.refresh_network().await;
            }
            NetEvent::PeerConnected(peer) => {
                self.peers.insert(peer);
                self.refresh_network().await;
            }
            NetEvent::Subscribed { peer, topic } if topic == self.deltas_hash => {
                // A member of this region. In a permissioned region only
                // those on the roster count towards a round's quorum.
                if let Some(id) = node_id_of(&peer).filter(|id| self.admitted(id))
                    && self.members.insert(peer)
                {
                    if self.running {
                        // Someone new (or back, after a cut): where is it?
                        self.ask_heads(vec![peer]);
                        self.feed(Input::PeerJoined(id)).await;
                    } else {
                        self.engine.handle(Input::PeerJoined(id), self.now_ms());
                    }
                }
            }
            NetEvent::Subscribed { .. } => {}
            NetEvent::Unsubscribed { peer, topic } => {
                if topic == self.deltas_hash
                    && self.members.remove(&peer)
                    && let Some(id) = node_id_of(&peer)
                {
                    self.feed(Input::PeerLeft(id)).await;
                }
            }
            NetEvent::PeerDisconnected(peer) => {
                self.peers.remove(&peer);
                if self.members.remove(&peer)
                    && let Some(id) = node_id_of(&peer)
                {
                    self.feed(Input::PeerLeft(id)).await;
                }
                self.refresh_network().await;
            }
            NetEvent::Request {
                peer,
                request,
                channel,
            } => {
                let response = self.answer(&request);
                if let FetchResponse::Chunk(bytes) = &response {
                    self.shared.metrics.chunks_served.inc();
                    self.count_out(bytes.len());
                }
                tracing::trace!(%peer, ?request, "request");
                let _ = self.net.send(Command::Respond { channel, response }).await;
            }
            NetEvent::Gossip {
                id,
                source,
                topic,
                data,
            } => {
                self.shared.metrics.bytes_in.inc_by(data.len() as u64);
                self.shared.update(|s| s.bytes_in += data.len() as u64);
                let acceptance = if topic == self.deltas_hash {
                    Some(self.on_delta(source, &data).await)
                } else if topic == self.models_hash {
                    // A version being verified is reported when the
                    // verdict comes: forwarded only if it passed.
                    self.on_model(source, &data, Some(id.clone())).await
                } else {
                    Some(MessageAcceptance::Ignore)
                };
                if let Some(acceptance) = acceptance {
                    self.report(id, source, acceptance).await;
                }
            }
        }
    }

    /// Validates an announced delta and hands it to the engine.
    async fn on_delta(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        if data.len() > net::MAX_ANNOUNCEMENT_BYTES {
            tracing::info!(%source, bytes = data.len(), "announcement rejected: oversized");
            self.count_rejected("oversized");
            return MessageAcceptance::Reject;
        }
        let manifest = match Signed::<DeltaManifest>::open(data) {
            Ok(m) => m,
            Err(e) => {
                let reason = match e {
                    tapestry_protocol::DecodeError::BadSignature
                    | tapestry_protocol::DecodeError::InvalidKey => "bad_signature",
                    tapestry_protocol::DecodeError::TooLarge { .. } => "oversized",
                    tapestry_protocol::DecodeError::Invalid(_) => "invalid",
                    _ => "malformed",
                };
                tracing::info!(%source, %reason, error = %e, "announcement rejected");
                self.count_rejected(reason);
                return MessageAcceptance::Reject;
            }
        };
        if !self.admitted(&manifest.message().author) {
            self.count_rejected("not_in_roster");
            return MessageAcceptance::Reject;
        }
        self.providers
            .entry(manifest.id())
            .or_default()
            .push(source);
        let now = self.now_ms();
        let actions = self.engine.handle(Input::DeltaAnnounced(manifest), now);
        let rejected = actions.iter().any(|a| matches!(a, Action::Penalise(_)));
        let fetching = actions.iter().any(|a| matches!(a, Action::Fetch { .. }));
        for action in actions {
            self.act(action).await;
        }
        if rejected {
            MessageAcceptance::Reject
        } else if fetching {
            self.shared.metrics.deltas_accepted.inc();
            self.shared.update(|s| s.deltas_accepted += 1);
            MessageAcceptance::Accept
        } else {
            // A duplicate, or one this node no longer needs.
            MessageAcceptance::Ignore
        }
    }

    /// A model version was announced (or a peer answered a head probe):
    /// check what its manifest alone can tell, then verify it by
    /// recomputation if it could matter to this node (a later round, a
    /// same-round version that could be preferred, a recent merge). Returns
    /// the gossip verdict now, or `None` when it comes with the
    /// verification's ([`Node::on_verdict`]).
    async fn on_model(
        &mut self,
        source: PeerId,
        data: &[u8],
        gossip: Option<libp2p::gossipsub::MessageId>,
    ) -> Option<MessageAcceptance> {
        let manifest = match Signed::<ModelManifest>::open(data) {
            Ok(m) => m,
            Err(_) => {
                self.count_rejected("bad_model_announcement");
                return Some(MessageAcceptance::Reject);
            }
        };
        let m = manifest.message();
        if !self.admitted(&m.author) {
            self.count_rejected("not_in_roster");
            return Some(MessageAcceptance::Reject);
        }
        let shape = check_shape(&self.settings.engine, m, self.engine.round());
        // Too far ahead to recompute: in a permissioned region, roster
        // members' attestations may still carry it (the verification asks).
        let far = matches!(shape, Err(VersionRejection::RoundJump { .. }))
            && self.settings.roster.is_some();
        if let Some(r) = shape.as_ref().err().filter(|_| !far) {
            tracing::info!(%source, version = %manifest.id().short(), reason = %r, "model version rejected");
            self.count_rejected(r.label());
            return Some(MessageAcceptance::Reject);
        }
        if self.is_verified(&manifest.id()) {
            return Some(MessageAcceptance::Accept);
        }
        if !self.running || !(far || heads::worth_verifying(&self.engine, m)) {
            return Some(MessageAcceptance::Ignore);
        }
        if m.round == self.engine.round().saturating_add(1)
            && self.early.len() < MAX_EARLY
            && !self.early.iter().any(|(e, ..)| e.id() == manifest.id())
        {
            self.early.push((manifest, source, gossip, Instant::now()));
            return None;
        }
        if self.verify_once(manifest, source, gossip) {
            None
        } else {
            Some(MessageAcceptance::Ignore)
        }
    }

    /// Whether this node verified a version.
    fn is_verified(&self, id: &ContentId) -> bool {
        is_verified(&self.store, id)
    }

    /// What a verification found: adopt, merge, remember or reject.
    async fn on_verdict(&mut self, v: Verdict) {
        forget(&self.offered, v.manifest.id());
        let checked = match v.result {
            Err(r) => {
                tracing::warn!(source = %v.source, version = %v.manifest.id().short(), round = v.manifest.message().round, reason = %r, "model version rejected");
                self.count_rejected(r.label());
                if let Some(id) = v.gossip {
                    self.report(id, v.source, MessageAcceptance::Reject).await;
                }
                return;
            }
            Ok(c) => c,
        };
        if let Some(id) = v.gossip {
            self.report(id, v.source, MessageAcceptance::Accept).await;
        }
        let source = v.source;
        let (manifest, (params, assessment)) = (v.manifest, checked);
        let round = manifest.message().round;
        let id = manifest.id();
        match heads::decide(&self.engine, manifest.clone(), params, assessment) {
            heads::Decision::Feed(input) => {
                if let Input::BranchOffered { weights, .. } = input.as_ref() {
                    tracing::info!(round, version = %id.short(), ?weights, "merging a branch that grew apart");
                }
                self.feed(*input).await;
            }
            heads::Decision::Remember(rank) => {
                // Kept for when this node closes its own round.
                if self.best_seen.get(&round).is_none_or(|(r, _, _)| rank > *r) {
                    self.best_seen.insert(round, (rank, manifest, source));
                }
            }
            heads::Decision::Leave => {}
        }
    }

    /// Asks `peers` for their heads; a head this node does not have comes
    /// back through `heads_rx` and is treated as an announcement.
    fn ask_heads(&mut self, peers: Vec<PeerId>) {
        let cfg = &self.settings.engine;
        let request = FetchRequest::Head {
            model_id: cfg.model_id.clone(),
            region: cfg.region.clone(),
        };
        let own = self.engine.version();
        for peer in peers {
            let (net, tx, offered) = (
                self.net.clone(),
                self.heads_tx.clone(),
                self.offered.clone(),
            );
            let request = request.clone();
            tokio::spawn(async move {
                let Ok(FetchResponse::Head(Some(id))) = net.fetch(peer, request).await else {
                    return;
                };
                if Some(id) == own || offered.lock().is_ok_and(|o| o.contains(&id)) {
                    return;
                }
                if let Ok(FetchResponse::SignedManifest(bytes)) =
                    net.fetch(peer, FetchRequest::SignedManifest(id)).await
                {
                    let _ = tx.send((peer, bytes)).await;
                }
            });
        }
    }

    /// Verifies the versions held back by [`Node::on_model`]: all of them
    /// (`all`, when this node has just made a version), or those held
    /// longer than a round's timeout.
    async fn verify_early(&mut self, all: bool) {
        let patience = Duration::from_millis(self.settings.engine.round_timeout_ms);
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
            .into_iter()
            .partition(|(.., at)| all || at.elapsed() >= patience);
        self.early = keep;
        for (manifest, source, gossip, _) in due {
            if !self.verify_once(manifest, source, gossip.clone())
                && let Some(id) = gossip
            {
                self.report(id, source, MessageAcceptance::Ignore).await;
            }
        }
    }

    /// Verifies a version this node would adopt (a remembered one, when
    /// this node closed its round).
    fn offer_if_preferred(
        &mut self,
        manifest: Verified<ModelManifest>,
        source: PeerId,
        gossip: Option<libp2p::gossipsub::MessageId>,
    ) {
        if self.engine.would_adopt(manifest.message()) {
            self.verify_once(manifest, source, gossip);
        }
    }

    /// Verifies a version by recomputation on its own task, unless it is
    /// already being verified or too many are; the verdict comes back
    /// through `verdicts_rx`. Returns whether a verification started.
    fn verify_once(
        &mut self,
        manifest: Verified<ModelManifest>,
        source: PeerId,
        gossip: Option<libp2p::gossipsub::MessageId>,
    ) -> bool {
        let fresh = self
            .offered
            .lock()
            .is_ok_and(|mut o| o.len() < MAX_VERIFYING && o.insert(manifest.id()));
        if !fresh {
            return false;
        }
        let cfg = &self.settings.engine;
        let furthest = self
            .engine
            .round()
            .saturating_add(cfg.door.max_rounds_ahead);
        let attest = self.settings.roster.as_ref().map(|r| {
            let members: BTreeSet<NodeId> = r.message().members.iter().copied().collect();
            AttestCtx {
                threshold: attest::threshold(members.len(), self.settings.attestations),
                members,
                ask: self.members.iter().copied().collect(),
            }
        });
        let ctx = VerifyCtx {
            recent: self.recent.clone(),
            net: self.net.clone(),
            store: self.store.clone(),
            shared: self.shared.clone(),
            cfg: cfg.clone(),
            door: self.engine.door().clone(),
            furthest,
            attest,
        };
        let mut providers = vec![source];
        if let Some(author) = net::peer_id_of(&manifest.message().author)
            && author != source
        {
            providers.push(author);
        }
        let tx = self.verdicts_tx.clone();
        tracing::debug!(round = manifest.message().round, version = %manifest.id().short(), "verifying a version");
        tokio::spawn(async move {
            let result = verify_offered(&ctx, &manifest, &providers).await;
            let _ = tx
                .send(Verdict {
                    manifest,
                    source,
                    gossip,
                    result,
                })
                .await;
        });
        true
    }

    /// This node's attestation of version `id`: only of a version it
    /// verified by recomputation (or made) and holds, not one it took on
    /// attestations, and not of its own (its manifest says it already).
    fn attestation(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        if !self.is_verified(id) || matches!(self.store.get_ref(&attested_ref(id)), Ok(Some(_))) {
            return None;
        }
        let m = self.store.get_model_manifest(id).ok()??;
        if m.message().author == self.key.node_id() {
            return None;
        }
        attest::attest(m.message(), &self.key)
    }

    /// Answers a peer's request from the store.
    fn answer(&self, request: &FetchRequest) -> FetchResponse {
        match request {
            FetchRequest::Chunk(id) => match self.store.get_verified(id) {
                Ok(Some(bytes)) => FetchResponse::Chunk(bytes.to_vec()),
                _ => FetchResponse::NotFound,
            },
            FetchRequest::SignedManifest(id) => match self.store.manifest_bytes(id) {
                Ok(Some((_, bytes))) => FetchResponse::SignedManifest(bytes.to_vec()),
                _ => FetchResponse::NotFound,
            },
            FetchRequest::Attest(id) => match self.attestation(id) {
                Some(a) => FetchResponse::SignedManifest(a.envelope_bytes().to_vec()),
                None => FetchResponse::NotFound,
            },
            FetchRequest::Head { model_id, region } => {
                let cfg = &self.settings.engine;
                if *model_id == cfg.model_id && *region == cfg.region {
                    FetchResponse::Head(self.engine.version())
                } else {
                    FetchResponse::NotFound
                }
            }
        }
    }
}

/// Checks that a roster governs this node's model and region and is signed
/// by the region key.
fn check_roster(roster: &Verified<Roster>, settings: &NodeSettings) -> Result<(), NodeError> {
    let r = roster.message();
    let cfg = &settings.engine;
    let Some(region_key) = settings.region_key else {
        return Err(NodeError::Config(
            "a roster needs the region key that signs it (region_key)".into(),
        ));
    };
    if roster.signer() != region_key {
        return Err(NodeError::Config(format!(
            "the roster is signed by {}, not by the region key {}",
            roster.signer(),
            region_key
        )));
    }
    if r.model_id != cfg.model_id || r.region != cfg.region {
        return Err(NodeError::Config(format!(
            "the roster governs {}/{}, not {}/{}",
            r.model_id, r.region, cfg.model_id, cfg.region
        )));
    }
    Ok(())
}

/// Versions verified at once (each on its own task); announcements beyond
/// that are ignored until one finishes (head probes bring them back).
const MAX_VERIFYING: usize = 16;

/// Next-round versions held back at once until this node closes its round
/// (more are verified at once, as before).
const MAX_EARLY: usize = 16;

/// Takes a version out of the set of versions being verified.
fn forget(offered: &Mutex<std::collections::HashSet<ContentId>>, id: ContentId) {
    if let Ok(mut o) = offered.lock() {
        o.remove(&id);
    }
}

/// Versions made or verified lately, by their inputs (bounded).
#[derive(Clone, Default)]
struct Recent(Arc<Mutex<std::collections::VecDeque<(ModelManifest, ContentId)>>>);

impl Recent {
    const KEEP: usize = 64;

    fn add(&self, m: &ModelManifest, id: ContentId) {
        if let Ok(mut r) = self.0.lock() {
            if r.len() >= Self::KEEP {
                r.pop_front();
            }
            r.push_back((m.clone(), id));
        }
    }

    /// A recent version that is the same computation as `m`.
    fn same_computation(
        &self,
        l: &impl Lineage,
        m: &ModelManifest,
    ) -> Option<(ModelManifest, ContentId)> {
        let r = self.0.lock().ok()?.clone();
        r.into_iter()
            .rev()
            .find(|(held, _)| verify::same_computation(l, held, m))
    }
}

/// What a verification task needs.
struct VerifyCtx {
    recent: Recent,
    net: NetHandle,
    store: Store,
    shared: Shared,
    cfg: EngineConfig,
    door: Door,
    /// The furthest round this node recomputes up to (its round plus
    /// `max_rounds_ahead`).
    furthest: u64,
    /// A permissioned region's attestation settings (`None`: open region,
    /// recomputation only).
    attest: Option<AttestCtx>,
}

/// Who may vouch for a version, whom to ask, and how many must.
struct AttestCtx {
    members: BTreeSet<NodeId>,
    ask: Vec<PeerId>,
    threshold: usize,
}

/// The verdict on one offered version.
struct Verdict {
    manifest: Verified<ModelManifest>,
    source: PeerId,
    gossip: Option<libp2p::gossipsub::MessageId>,
    result: Result<(Vec<f32>, heads::Assessment), VersionRejection>,
}

/// The chunk store as [`Lineage`], with the manifests fetched for one
/// verification held aside until they pass (so nothing unverified is
/// stored as valid or served to peers).
struct StoreLineage<'a> {
    store: &'a Store,
    models: HashMap<ContentId, Verified<ModelManifest>>,
    deltas: HashMap<ContentId, Verified<DeltaManifest>>,
}

impl Lineage for StoreLineage<'_> {
    fn model(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        self.models
            .get(id)
            .cloned()
            .or_else(|| self.store.get_model_manifest(id).ok().flatten())
    }

    fn delta(&self, id: &ContentId) -> Option<Verified<DeltaManifest>> {
        self.deltas
            .get(id)
            .cloned()
            .or_else(|| self.store.get_delta_manifest(id).ok().flatten())
    }

    fn has_payload(&self, d: &Verified<DeltaManifest>) -> bool {
        d.message()
            .chunk_ids
            .iter()
            .all(|c| self.store.has(c).unwrap_or(false))
    }

    fn payload(&self, d: &Verified<DeltaManifest>) -> Option<Vec<u8>> {
        let m = d.message();
        self.store.read_payload(&m.chunk_ids, m.payload_bytes).ok()
    }

    fn is_verified(&self, id: &ContentId) -> bool {
        is_verified(self.store, id)
    }

    fn params(&self, id: &ContentId) -> Option<Vec<f32>> {
        let m = self.store.get_model_manifest(id).ok().flatten()?;
        let m = m.message();
        let bytes = self
            .store
            .read_payload(&m.chunk_ids, m.payload_bytes)
            .ok()?;
        Some(floats(&bytes))
    }
}

/// Fetches one signed manifest by id from the first provider that has it.
async fn fetch_manifest(net: &NetHandle, providers: &[PeerId], id: ContentId) -> Option<Vec<u8>> {
    for peer in providers {
        if let Ok(FetchResponse::SignedManifest(b)) =
            net.fetch(*peer, FetchRequest::SignedManifest(id)).await
        {
            return Some(b);
        }
    }
    None
}

/// Verifies `target`: by recomputation, or — where that is impossible (the
/// version is too far ahead, or ancestors or deltas cannot be had) and the
/// region is permissioned — on the attestations of enough roster members.
async fn verify_offered(
    ctx: &VerifyCtx,
    target: &Verified<ModelManifest>,
    providers: &[PeerId],
) -> Result<(Vec<f32>, heads::Assessment), VersionRejection> {
    let m = target.message();
    let far = m.round > ctx.furthest;
    let recomputed = if far {
        Err(VersionRejection::RoundJump {
            round: m.round,
            expected: ctx.furthest,
        })
    } else {
        recompute_offered(ctx, target, providers).await
    };
    let impossible = far
        || matches!(
            recomputed,
            Err(VersionRejection::UnknownParent(_)
                | VersionRejection::UnknownDelta(_)
                | VersionRejection::TooFarBehind { .. })
        );
    match (recomputed, &ctx.attest) {
        (Err(e), Some(a)) if impossible => match take_attested(ctx, a, target).await {
            Ok(taken) => Ok(taken),
            Err(why) => {
                tracing::debug!(version = %target.id().short(), %why, "not attested");
                Err(e)
            }
        },
        (r, _) => r,
    }
}

/// Takes `target` on attestations: asks the connected roster members for
/// theirs, and if at least the threshold of distinct members vouch for it
/// (its author included), fetches its parameters by their chunk ids and
/// keeps it, marked verified and attested, with the attestations.
async fn take_attested(
    ctx: &VerifyCtx,
    a: &AttestCtx,
    target: &Verified<ModelManifest>,
) -> Result<(Vec<f32>, heads::Assessment), String> {
    let m = target.message();
    let asks = a.ask.iter().map(|peer| {
        let net = ctx.net.clone();
        async move {
            (
                *peer,
                net.fetch(*peer, FetchRequest::Attest(target.id())).await,
            )
        }
    });
    let mut attestations = Vec::new();
    let mut from = Vec::new();
    for (peer, answer) in futures::future::join_all(asks).await {
        if let Ok(FetchResponse::SignedManifest(bytes)) = answer
            && let Ok(v) = Signed::<ModelManifest>::open(&bytes)
            && attest::attests(v.message(), m)
        {
            attestations.push(v);
            from.push(peer);
        }
    }
    let vouchers = attest::vouchers(target, &attestations, &a.members);
    if vouchers.len() < a.threshold {
        return Err(format!(
            "{} of {} roster members vouch for it",
            vouchers.len(),
            a.threshold
        ));
    }
    if let Some(author) = net::peer_id_of(&m.author)
        && !from.contains(&author)
    {
        from.push(author);
    }
    if !fetch_chunks(
        &ctx.net,
        &ctx.store,
        target.id(),
        &m.chunk_ids,
        &from,
        &ctx.shared,
    )
    .await
    {
        return Err("its parameters could not be had".into());
    }
    let params = ctx
        .store
        .read_payload(&m.chunk_ids, m.payload_bytes)
        .map(|b| floats(&b))
        .map_err(|e| e.to_string())?;
    if params.len() != ctx.cfg.spec.n_params() || params.iter().any(|v| !v.is_finite()) {
        return Err("its parameters are malformed".into());
    }
    let kept = (|| -> Result<(), tapestry_storage::StoreError> {
        for v in &attestations {
            ctx.store.put_model_manifest(v)?;
        }
        ctx.store.put_model_manifest(target)?;
        ctx.store
            .set_ref(&attested_ref(&target.id()), target.id())?;
        ctx.store
            .set_ref(&verified_ref(&target.id()), target.id())?;
        Ok(())
    })();
    kept.map_err(|e| e.to_string())?;
    tracing::info!(round = m.round, version = %target.id().short(), vouchers = vouchers.len(), "version taken on roster members' attestations");
    ctx.shared.metrics.versions_attested.inc();
    ctx.shared.update(|s| s.versions_attested += 1);
    let head = ctx.store.get_ref(HEAD_REF).ok().flatten();
    Ok((params, heads::Assessment::attested(head, vouchers.len())))
}

/// Verifies `target` by recomputation: fetches what [`verify::plan`] says
/// is missing (ancestor and delta manifests, delta chunks) from
/// `providers`, then recomputes every unverified version from its verified
/// parent, oldest first, storing each that passes (parameters as this node
/// computed them, never as a peer sent them) and marking it verified.
async fn recompute_offered(
    ctx: &VerifyCtx,
    target: &Verified<ModelManifest>,
    providers: &[PeerId],
) -> Result<(Vec<f32>, heads::Assessment), VersionRejection> {
    let mut l = StoreLineage {
        store: &ctx.store,
        models: HashMap::new(),
        deltas: HashMap::new(),
    };
    // The same computation as a version this node made or verified: its
    // parameters are known, so compare instead of recomputing.
    if let Some((held, held_id)) = ctx.recent.same_computation(&l, target.message())
        && is_verified(&ctx.store, &held_id)
    {
        if held.chunk_ids != target.message().chunk_ids {
            return Err(VersionRejection::Mismatch);
        }
        let params = l.params(&held_id);
        let kept = ctx
            .store
            .put_model_manifest(target)
            .and_then(|_| ctx.store.set_ref(&verified_ref(&target.id()), target.id()));
        if let (Some(params), Ok(())) = (params, kept) {
            ctx.shared.metrics.versions_matched.inc();
            ctx.shared.update(|s| s.versions_matched += 1);
            let checked = verify::Checked {
                authors: verify::distinct_authors(&l, target.message()),
                params,
            };
            let head = ctx.store.get_ref(HEAD_REF).ok().flatten();
            let assessment = heads::assess(&l, &ctx.cfg, head, target, &checked);
            return Ok((checked.params, assessment));
        }
    }
    let max_chain = (ctx.cfg.door.max_rounds_ahead as usize)
        .saturating_mul(2)
        .saturating_add(16);
    let mut order = None;
    // Each pass discovers one more generation of ancestors.
    for _ in 0..=max_chain {
        match verify::plan(&l, &ctx.cfg, target, max_chain)? {
            Plan::Ready(o) => {
                order = Some(o);
                break;
            }
            Plan::Need {
                models,
                deltas,
                payloads,
            } => {
                let mut progress = false;
                for id in &models {
                    let got = fetch_manifest(&ctx.net, providers, *id)
                        .await
                        .and_then(|b| Signed::<ModelManifest>::open(&b).ok())
                        .filter(|v| v.id() == *id);
                    match got {
                        Some(v) => {
                            l.models.insert(*id, v);
                            progress = true;
                        }
                        None => return Err(VersionRejection::UnknownParent(*id)),
                    }
                }
                for id in &deltas {
                    let got = fetch_manifest(&ctx.net, providers, *id)
                        .await
                        .and_then(|b| Signed::<DeltaManifest>::open(&b).ok())
                        .filter(|v| v.id() == *id);
                    match got {
                        Some(v) => {
                            l.deltas.insert(*id, v);
                            progress = true;
                        }
                        None => return Err(VersionRejection::UnknownDelta(*id)),
                    }
                }
                for dm in &payloads {
                    let mut from = providers.to_vec();
                    if let Some(author) = net::peer_id_of(&dm.message().author)
                        && !from.contains(&author)
                    {
                        from.push(author);
                    }
                    let m = dm.message();
                    if !fetch_chunks(
                        &ctx.net,
                        &ctx.store,
                        dm.id(),
                        &m.chunk_ids,
                        &from,
                        &ctx.shared,
                    )
                    .await
                    {
                        return Err(VersionRejection::UnknownDelta(dm.id()));
                    }
                    ctx.shared
                        .metrics
                        .verify_fetched_bytes
                        .inc_by(m.payload_bytes);
                    ctx.shared
                        .update(|s| s.verify_fetched_bytes += m.payload_bytes);
                    progress = true;
                }
                if !progress {
                    return Err(VersionRejection::TooFarBehind { limit: max_chain });
                }
            }
        }
    }
    let order = order.ok_or(VersionRejection::TooFarBehind { limit: max_chain })?;
    let store = ctx.store.clone();
    let started = Instant::now();
    let mut recomputed = 0;
    let mut keep_s = 0.0;
    let checked = verify::verify_in_order(
        &mut l,
        &ctx.cfg,
        &ctx.door,
        target,
        &order,
        |l, v, checked| {
            // Keep it: the deltas it names, its parameters as computed here,
            // its manifest, and the mark that it is verified.
            let keeping = Instant::now();
            let kept = (|| -> Result<(), tapestry_storage::StoreError> {
                for d in &v.message().deltas {
                    if let Some(dm) = l.deltas.get(d) {
                        store.put_delta_manifest(dm)?;
                    }
                }
                let bytes = tapestry_protocol::f32_le_bytes(&checked.params);
                store.put_payload(&bytes, v.message().chunk_size as usize)?;
                store.put_model_manifest(v)?;
                store.set_ref(&verified_ref(&v.id()), v.id())?;
                Ok(())
            })();
            recomputed += 1;
            keep_s += keeping.elapsed().as_secs_f64();
            if kept.is_ok() {
                ctx.recent.add(v.message(), v.id());
            }
            kept.map_err(|e| {
                tracing::error!(error = %e, "cannot store a verified version");
                VersionRejection::UnknownParent(v.id())
            })
        },
    );
    let took = (started.elapsed().as_secs_f64() - keep_s).max(0.0);
    ctx.shared.metrics.recompute_seconds.inc_by(took);
    ctx.shared.metrics.versions_verified.inc_by(recomputed);
    ctx.shared.update(|s| {
        s.recompute_ms += took * 1e3;
        s.keep_verified_ms += keep_s * 1e3;
        s.versions_verified += recomputed;
    });
    let checked = checked?;
    let head = ctx.store.get_ref(HEAD_REF).ok().flatten();
    let assessment = heads::assess(&l, &ctx.cfg, head, target, &checked);
    Ok((checked.params, assessment))
}

/// f32 little-endian bytes to values.
pub fn floats(bytes: &[u8]) -> Vec<f32> {
    tapestry_protocol::f32_from_le_bytes(bytes)
}

/// Provider records this node keeps in the DHT: its own recent deltas and
/// versions. (It serves what it fetched too, to whoever asks, but does not
/// advertise it.)
const MAX_PROVIDED: usize = 256;

/// Chunk fetches in flight at once for one payload.
const PARALLEL_FETCHES: usize = 8;

/// Fetches the chunks of `ids` not yet in the store, several at once, each
/// from `providers` in turn (starting at a different one per chunk, so the
/// load spreads), checking each against its id before storing it. A peer
/// that serves a wrong chunk is not asked again. Between attempts (with
/// backoff) the DHT is asked who else provides `content`.
async fn fetch_chunks(
    net: &NetHandle,
    store: &Store,
    content: ContentId,
    ids: &[ContentId],
    providers: &[PeerId],
    shared: &Shared,
) -> bool {
    use futures::StreamExt;
    let bad = Mutex::new(BTreeSet::<PeerId>::new());
    let mut providers: Vec<PeerId> = providers.to_vec();
    let mut missing: Vec<ContentId> = ids
        .iter()
        .filter(|id| !store.has(id).unwrap_or(false))
        .copied()
        .collect();
    for attempt in 0..4u32 {
        if missing.is_empty() {
            return true;
        }
        let order = &providers;
        let bad = &bad;
        let failed: Vec<ContentId> = futures::stream::iter(missing.clone().into_iter().enumerate())
            .map(|(k, id)| async move {
                let n = order.len().max(1);
                for step in 0..order.len() {
                    let peer = order[(k + step) % n];
                    if bad.lock().map(|b| b.contains(&peer)).unwrap_or(false) {
                        continue;
                    }
                    match net.fetch(peer, FetchRequest::Chunk(id)).await {
                        Ok(FetchResponse::Chunk(bytes)) if ContentId::of(&bytes) == id => {
                            shared.metrics.chunks_fetched.inc();
                            shared.metrics.bytes_in.inc_by(bytes.len() as u64);
                            shared.update(|s| s.bytes_in += bytes.len() as u64);
                            if store.put(&bytes).is_ok() {
                                return None;
                            }
                        }
                        Ok(FetchResponse::Chunk(_)) => {
                            tracing::warn!(%peer, chunk = %id.short(), "peer served a corrupt chunk");
                            shared.metrics.reject("corrupt_chunk");
                            if let Ok(mut b) = bad.lock() {
                                b.insert(peer);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(%peer, error = %e, "chunk fetch failed"),
                    }
                }
                Some(id)
            })
            .buffer_unordered(PARALLEL_FETCHES)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        missing = failed;
        if missing.is_empty() {
            return true;
        }
        // Who else has it?
        if let Ok(more) = net.providers(content).await {
            for p in more {
                if p != net.peer_id() && !providers.contains(&p) {
                    providers.push(p);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    missing.is_empty()
}

/// Writes `data` to `path` so that a crash leaves the old or the new
/// contents, never a mix: a temporary file beside it, synced, renamed over.
fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

async fn fetch_payload(
    net: &NetHandle,
    store: &Store,
    manifest: &Verified<DeltaManifest>,
    providers: &[PeerId],
    shared: &Shared,
) -> Option<Vec<u8>> {
    let m = manifest.message();
    if !fetch_chunks(net, store, manifest.id(), &m.chunk_ids, providers, shared).await {
        return None;
    }
    store.put_delta_manifest(manifest).ok()?;
    store.read_payload(&m.chunk_ids, m.payload_bytes).ok()
}

/// Everything needed to start a node.
pub struct Launch {
    /// Its identity.
    pub key: Keypair,
    /// Its settings.
    pub settings: NodeSettings,
    /// Its store.
    pub store: Store,
    /// Its private data.
    pub data: LocalData,
    /// Its network settings.
    pub net: net::NetConfig,
    /// Where to serve the HTTP API, if anywhere.
    pub api: Option<std::net::SocketAddr>,
}

/// A started node.
pub struct Running {
    /// Its status, head and metrics.
    pub shared: Shared,
    /// The bound API address.
    pub api: Option<std::net::SocketAddr>,
    /// Its network handle.
    pub net: NetHandle,
    shutdown: watch::Sender<bool>,
    node: tokio::task::JoinHandle<Result<(), NodeError>>,
    net_task: tokio::task::JoinHandle<()>,
    api_task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The addresses it listens on, once it does (waits up to 10 s).
    pub async fn listen_addrs(&self) -> Vec<libp2p::Multiaddr> {
        for _ in 0..100 {
            if let Ok(snap) = self.net.snapshot().await
                && !snap.listen.is_empty()
            {
                return snap.listen.iter().filter_map(|a| a.parse().ok()).collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Vec::new()
    }

    /// Stops the node cleanly: the node task finishes and flushes the
    /// store, then the network and the API stop.
    pub async fn stop(self) -> Result<(), NodeError> {
        let _ = self.shutdown.send(true);
        let result = match self.node.await {
            Ok(r) => r,
            Err(e) => Err(NodeError::Config(format!("node task failed: {e}"))),
        };
        self.net_task.abort();
        if let Some(api) = self.api_task {
            let _ = api.await;
        }
        result
    }
}

/// Starts the network, the node and (if asked) the API.
pub async fn launch(l: Launch) -> Result<Running, NodeError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let (handle, events, net_task) = net::spawn(&l.key, l.net, &mut registry)?;
    let shared = Shared::new(Arc::new(crate::metrics::Metrics::new(registry)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (api, api_task) = match l.api {
        Some(addr) => {
            let (bound, task) = crate::api::serve(addr, shared.clone(), shutdown_rx.clone())
                .await
                .map_err(|e| NodeError::Config(format!("cannot serve the API on {addr}: {e}")))?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let node = Node::new(
        l.settings,
        l.key,
        l.store,
        handle.clone(),
        l.data,
        shared.clone(),
    )?;
    let node = tokio::spawn(node.run(events, shutdown_rx));
    Ok(Running {
        shared,
        api,
        net: handle,
        shutdown,
        node,
        net_task,
        api_task,
    })
}
