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

use crate::core::data::Dataset;
use crate::core::engine::{
    Action, Engine, EngineConfig, Input, VersionRank, genesis, version_rank,
};
use crate::core::model::{InnerState, TrainConfig, evaluate, train_local};
use crate::metrics::Metrics;
use crate::net::{self, Command, NetEvent, NetHandle};

/// The store a node keeps everything in.
pub type Store = Arc<dyn ChunkStore + Send + Sync>;

/// The ref naming a node's head model version.
pub const HEAD_REF: &str = "head";

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
    /// The preferred version announced for each coming round, and who
    /// announced it.
    best_seen: BTreeMap<u64, (VersionRank, Verified<ModelManifest>, PeerId)>,
    /// What this node announces in the DHT, oldest first.
    provided: std::collections::VecDeque<ContentId>,
    /// Versions being fetched to be offered to the engine (a fetch that
    /// fails takes its version out again, so it can be tried again).
    offered: Arc<Mutex<std::collections::HashSet<ContentId>>>,
    /// Heads peers answered with, as signed bytes, and who answered.
    heads_tx: mpsc::Sender<(PeerId, Vec<u8>)>,
    heads_rx: mpsc::Receiver<(PeerId, Vec<u8>)>,
    /// Which peers to ask for their heads next (they take turns).
    head_probe: usize,
    /// When the last training started (or will, when paced).
    last_train: Option<Instant>,
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
        if let Some(roster) = &settings.roster {
            check_roster(roster, &settings)?;
        }
        let cfg = &settings.engine;
        let deltas_topic = deltas_topic(&cfg.model_id, &cfg.region);
        let models_topic = models_topic(&cfg.model_id, &cfg.region);
        let (inputs_tx, inputs_rx) = mpsc::channel(256);
        let (heads_tx, heads_rx) = mpsc::channel(64);
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
            provided: std::collections::VecDeque::new(),
            offered: Arc::default(),
            heads_tx,
            heads_rx,
            head_probe: 0,
            last_train: None,
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

    fn keep_version(&self, m: &Verified<ModelManifest>, params: &[f32]) -> Result<(), NodeError> {
        let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.store
            .put_payload(&bytes, m.message().chunk_size as usize)?;
        let id = self.store.put_model_manifest(m)?;
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
                    self.on_model(peer, &bytes).await;
                }
                _ = ticker.tick() => {
                    self.refresh_network().await;
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
                    self.offer_if_preferred(best, source);
                }
                self.shared.metrics.rounds.inc();
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
        self.shared.update(|s| {
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
                    self.on_delta(source, &data).await
                } else if topic == self.models_hash {
                    self.on_model(source, &data).await
                } else {
                    MessageAcceptance::Ignore
                };
                self.report(id, source, acceptance).await;
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

    /// A model version was announced: note it, and catch up if it is well
    /// ahead of this node.
    async fn on_model(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        let manifest = match Signed::<ModelManifest>::open(data) {
            Ok(m) => m,
            Err(_) => {
                self.count_rejected("bad_model_announcement");
                return MessageAcceptance::Reject;
            }
        };
        let m = manifest.message();
        if !self.admitted(&m.author) {
            self.count_rejected("not_in_roster");
            return MessageAcceptance::Reject;
        }
        if m.model_id != self.settings.engine.model_id || m.region != self.settings.engine.region {
            self.count_rejected("wrong_scope");
            return MessageAcceptance::Reject;
        }
        // Well ahead: catch up. Same round but preferred: two nodes closed
        // the round on different sets of deltas; settle on the preferred
        // version, as every node of the region does. The next round's
        // versions are remembered, for when this node gets there.
        let own = self.engine.round();
        if m.round == own + 1 {
            let rank = version_rank(m);
            let better = self
                .best_seen
                .get(&m.round)
                .is_none_or(|(r, _, _)| rank > *r);
            if better {
                self.best_seen
                    .insert(m.round, (rank, manifest.clone(), source));
            }
        }
        let wanted = m.round > own + 1 || m.round == own;
        if self.running && wanted {
            self.offer_if_preferred(manifest, source);
        } else if self.running
            && m.round < own
            && m.round + BRANCH_WINDOW >= own
            && m.parents.len() > 1
        {
            // A recent merge of branches that grew apart: this node has
            // moved on, but may lack one side's work; if so, merge it too.
            self.offer_branch(manifest, source);
        }
        MessageAcceptance::Accept
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

    /// Fetches a version and offers it to the engine if the engine would
    /// take it (and it is not already on its way).
    fn offer_if_preferred(&mut self, manifest: Verified<ModelManifest>, source: PeerId) {
        if self.engine.would_adopt(manifest.message()) {
            self.fetch_once(manifest, source, true);
        }
    }

    /// Fetches a version this node would not adopt, to merge it if it holds
    /// work this node's branch lacks.
    fn offer_branch(&mut self, manifest: Verified<ModelManifest>, source: PeerId) {
        self.fetch_once(manifest, source, false);
    }

    /// [`Node::catch_up`], unless that version is already being fetched.
    fn fetch_once(&mut self, manifest: Verified<ModelManifest>, source: PeerId, adopting: bool) {
        let fresh = self
            .offered
            .lock()
            .is_ok_and(|mut o| o.insert(manifest.id()));
        if fresh {
            self.catch_up(manifest, vec![source], adopting);
        }
    }

    /// Fetches a version (and its lineage's manifests), then offers it to
    /// the engine: to adopt (`adopting`), or to merge if the two branches
    /// grew apart.
    fn catch_up(
        &mut self,
        manifest: Verified<ModelManifest>,
        providers: Vec<PeerId>,
        adopting: bool,
    ) {
        let (net, store, tx, shared) = (
            self.net.clone(),
            self.store.clone(),
            self.inputs_tx.clone(),
            self.shared.clone(),
        );
        let n = self.settings.engine.spec.n_params();
        tracing::info!(round = manifest.message().round, version = %manifest.id().short(), "fetching a preferred version");
        let offered = self.offered.clone();
        tokio::spawn(async move {
            let id = manifest.id();
            if let Some(params) = fetch_model(&net, &store, &manifest, &providers, n, &shared).await
            {
                // Adopt it, unless this node's branch holds recent work the
                // offered one lacks (the two grew apart in a partition):
                // then merge the two.
                let head = store.get_ref(HEAD_REF).ok().flatten();
                let input = match head.and_then(|h| branch_weights(&store, h, &manifest, adopting))
                {
                    Some(weights) => {
                        tracing::info!(round = manifest.message().round, version = %id.short(), ?weights, "merging a branch that grew apart");
                        Input::BranchOffered {
                            manifest,
                            params,
                            against: head.unwrap_or(id),
                            weights,
                        }
                    }
                    None if adopting => Input::ModelOffered { manifest, params },
                    None => return forget(&offered, id),
                };
                let _ = tx.send(input).await;
            }
            forget(&offered, id);
        });
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

/// Most ancestor manifests fetched along with one adopted version.
const MAX_LINEAGE_FETCH: usize = 4096;

/// f32 little-endian bytes to values.
pub fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
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

async fn fetch_model(
    net: &NetHandle,
    store: &Store,
    manifest: &Verified<ModelManifest>,
    providers: &[PeerId],
    n_params: usize,
    shared: &Shared,
) -> Option<Vec<f32>> {
    let m = manifest.message();
    if m.payload_bytes != (n_params * 4) as u64 {
        return None;
    }
    if !fetch_chunks(net, store, manifest.id(), &m.chunk_ids, providers, shared).await {
        return None;
    }
    store.put_model_manifest(manifest).ok()?;
    complete_lineage(net, store, m, providers).await;
    let bytes = store.read_payload(&m.chunk_ids, m.payload_bytes).ok()?;
    Some(floats(&bytes))
}

/// Takes a version out of the set of versions being fetched.
fn forget(offered: &Mutex<std::collections::HashSet<ContentId>>, id: ContentId) {
    if let Ok(mut o) = offered.lock() {
        o.remove(&id);
    }
}

/// Rounds back from the earlier of two versions over which their lineages
/// are compared to tell a partition from a same-round disagreement.
const BRANCH_WINDOW: u64 = 16;

/// Rounds in which one author's deltas must be missing from a lineage for
/// two branches to count as grown apart (see `branch_weights`).
const BRANCH_ROUNDS: usize = 3;

/// The deltas aggregated into the lineage of `version` in versions of
/// rounds `lo..hi`, as far as the store holds the manifests, with the
/// round of the version that aggregated each.
fn window_deltas(store: &Store, version: ContentId, lo: u64, hi: u64) -> BTreeMap<ContentId, u64> {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut queue = vec![version];
    while let Some(v) = queue.pop() {
        if seen.len() > 4 * MAX_LINEAGE_FETCH || !seen.insert(v) {
            continue;
        }
        let Ok(Some(m)) = store.get_model_manifest(&v) else {
            continue;
        };
        let m = m.message();
        if m.round < lo {
            continue;
        }
        if m.round < hi {
            for d in &m.deltas {
                out.entry(*d).or_insert(m.round);
            }
        }
        queue.extend(m.parents.iter().copied());
    }
    out
}

/// Rounds in which an author's deltas are in `a` and not in `b`: for each
/// author, the set of rounds.
fn missing_by_author(
    store: &Store,
    a: &BTreeMap<ContentId, u64>,
    b: &BTreeMap<ContentId, u64>,
) -> BTreeMap<NodeId, BTreeSet<u64>> {
    let mut out: BTreeMap<NodeId, BTreeSet<u64>> = BTreeMap::new();
    for (d, round) in a {
        if b.contains_key(d) {
            continue;
        }
        if let Ok(Some(m)) = store.get_delta_manifest(d) {
            out.entry(m.message().author).or_default().insert(*round);
        }
    }
    out
}

/// Whether `head` and `other` are branches that grew apart (a partition),
/// and if so the weights to merge them with.
///
/// In broadcast mode nodes that closed a round on different sets of
/// deltas go on in parallel lines for a while, and a line that gave way
/// to a preferred version loses the deltas only it had aggregated, so
/// lineages always differ by a few deltas, scattered over authors and
/// rounds. A partition is different: for rounds on end, the other side's
/// authors are missing from a lineage altogether. So: over the
/// BRANCH_WINDOW rounds before the last (which may still be settling),
/// the rounds in which an author's deltas are in one lineage and not in the
/// other (looked for a couple of rounds either side). Adopting `other`
/// (`adopting`) would lose this node's; ignoring it would lose the
/// other's. If some author would lose deltas of BRANCH_ROUNDS rounds or
/// more, the branches grew apart; each side's weight is one plus the
/// number of its deltas the other lacks.
fn branch_weights(
    store: &Store,
    head: ContentId,
    other: &Verified<ModelManifest>,
    adopting: bool,
) -> Option<(f64, f64)> {
    if head == other.id() {
        return None;
    }
    let head_round = store
        .get_model_manifest(&head)
        .ok()
        .flatten()?
        .message()
        .round;
    let hi = head_round.min(other.message().round);
    let lo = hi.saturating_sub(BRANCH_WINDOW);
    // One walk per lineage over the wide window; the window proper is the
    // part of it in lo..hi.
    let ours_wide = window_deltas(store, head, lo.saturating_sub(2), hi + 3);
    let theirs_wide = window_deltas(store, other.id(), lo.saturating_sub(2), hi + 3);
    let within = |m: &BTreeMap<ContentId, u64>| -> BTreeMap<ContentId, u64> {
        m.iter()
            .filter(|(_, r)| (lo..hi).contains(*r))
            .map(|(d, r)| (*d, *r))
            .collect()
    };
    let (ours, theirs) = (within(&ours_wide), within(&theirs_wide));
    if ours.is_empty() || theirs.is_empty() {
        // One lineage is not held here (it could not be fetched): no
        // telling, so no merge.
        return None;
    }
    let lost = if adopting {
        missing_by_author(store, &ours, &theirs_wide)
    } else {
        missing_by_author(store, &theirs, &ours_wide)
    };
    let worst = lost.values().map(BTreeSet::len).max().unwrap_or(0);
    tracing::debug!(rounds = ?(lo..hi), worst, authors = lost.len(), adopting, "lineages compared");
    if worst < BRANCH_ROUNDS {
        return None;
    }
    let only_ours = ours.keys().filter(|d| !theirs_wide.contains_key(d)).count();
    let only_theirs = theirs.keys().filter(|d| !ours_wide.contains_key(d)).count();
    tracing::info!(
        rounds = ?(lo..hi),
        ours = ours.len(),
        theirs = theirs.len(),
        only_ours,
        only_theirs,
        worst,
        "this node's branch and the offered one grew apart"
    );
    Some((1.0 + only_ours as f64, 1.0 + only_theirs as f64))
}

/// Keeps the lineage of a version traceable: fetches the signed manifests
/// (small) of its ancestors and their deltas that this node does not hold,
/// from `providers`, each tried a few times; older parameters are not
/// fetched. Walks through what is held too, since a version may have been
/// stored (by a concurrent fetch) before its ancestors were. At most
/// MAX_LINEAGE_FETCH manifests are visited.
async fn complete_lineage(net: &NetHandle, store: &Store, m: &ModelManifest, providers: &[PeerId]) {
    let mut queue: std::collections::VecDeque<ContentId> =
        m.parents.iter().chain(&m.deltas).copied().collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(id) = queue.pop_front() {
        if seen.len() >= MAX_LINEAGE_FETCH || !seen.insert(id) {
            continue;
        }
        let mut bytes = store
            .manifest_bytes(&id)
            .ok()
            .flatten()
            .map(|(_, b)| b.to_vec());
        'fetch: for attempt in 0..3u32 {
            if bytes.is_some() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            for peer in providers {
                if let Ok(FetchResponse::SignedManifest(b)) =
                    net.fetch(*peer, FetchRequest::SignedManifest(id)).await
                {
                    let stored = match Signed::<ModelManifest>::open(&b) {
                        Ok(v) => v.id() == id && store.put_model_manifest(&v).is_ok(),
                        Err(_) => Signed::<DeltaManifest>::open(&b)
                            .is_ok_and(|d| d.id() == id && store.put_delta_manifest(&d).is_ok()),
                    };
                    if stored {
                        bytes = Some(b);
                        break 'fetch;
                    }
                }
            }
        }
        match bytes.map(|b| Signed::<ModelManifest>::open(&b)) {
            Some(Ok(v)) => queue.extend(v.message().parents.iter().chain(&v.message().deltas)),
            Some(Err(_)) => {} // a delta: no ancestors of its own
            None => {
                tracing::debug!(manifest = %id.short(), "an ancestor manifest could not be had")
            }
        }
    }
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
